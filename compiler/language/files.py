"""Reading a file the user named, safely: only a regular file, and never more than a budget.

A FIFO would block the open or the read forever, `/dev/zero` reads without end (its size is 0, so
a size check before reading passes it), a directory or a socket fails with an OS error that says
little. Every file epicycle reads on the user's behalf (specs, data, checkpoints' side files)
comes through `read_regular_file`, which opens without blocking, checks what the open descriptor
is (not the path, which could be swapped between a check and the open), and reads at most
`limit` bytes."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from compiler.language.diagnostics import Diagnostic, Span, SpecError

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def describe_file_kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_regular_file(
    path: str | Path, *, limit: int, what: str = "file", hint: str | None = None
) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes; anything else
    is a located error (`path:1:1`) that names what the path is and, with `hint`, what to do."""
    shown = str(path)

    def refuse(message: str) -> SpecError:
        return SpecError([Diagnostic(Span(shown, 1, 1), message, hint)])

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        descriptor = os.open(shown, flags)
    except FileNotFoundError:
        raise refuse(f"no such {what}") from None
    except IsADirectoryError:
        raise refuse(f"the {what} path is a directory, not a file") from None
    except PermissionError:
        raise refuse(f"permission denied reading the {what}") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO or socket with nobody at the other end
            raise refuse(f"the {what} path is {describe_file_kind(stat.S_IFIFO)}") from None
        raise refuse(f"cannot open the {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(f"the {what} path is {describe_file_kind(mode)}, not a regular file")
        size = os.fstat(descriptor).st_size
        if size > limit:
            raise refuse(f"the {what} has {size:,} bytes; at most {limit:,} are read")
        chunks, total = [], 0
        while True:  # a file that grows while read stops at the budget, too
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise refuse(f"the {what} has more than {limit:,} bytes; at most that is read")
        return b"".join(chunks)
    except OSError as exc:
        raise refuse(f"cannot read the {what}: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
