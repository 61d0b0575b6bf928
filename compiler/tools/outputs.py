"""Where a command writes: one rule for every output path, and writes that are all or nothing.

The rule, the same in `schema -o`, `compile --out`, `train --out`, `export -o`, `viz -o`,
`viz --lattice --out` and `data -o`:

* Missing parent directories are created, but only when the command has something to write, and
  only if the whole path can be made. An existing part of the path that is not a directory, a
  `..` after a directory that does not exist yet (`nonexist/../run`, which the OS cannot resolve),
  or a directory that cannot be written to is refused before anything is created.
* A file output must not be an existing directory or a special file (a device, a FIFO, a
  socket); a directory output must be a directory or not exist yet.
* A file is written to a private staging directory beside it and renamed into place, so a failed
  write leaves the previous file (or nothing) and never half a file. It gets the permissions the
  umask gives any new file (safetensors and `tempfile` create theirs 0600).
* If the command fails, the directories it created are removed again.

A path of the wrong kind for its option is a usage error (exit 2); a path the system refuses
(permissions, a read-only or special file system, a full disk) exits 1. Both are `OutputError`,
which the CLI prints located on the command line (`--out PATH`) with what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from compiler.language.files import describe_file_kind

__all__ = [
    "OutputError",
    "check_directory_output",
    "check_file_output",
    "new_file_mode",
    "output_directory",
    "publish",
    "write_file",
    "write_with",
]


@dataclass
class OutputError(Exception):
    """An output path that cannot be written: `usage` when the path is of the wrong kind for its
    option (exit 2), otherwise the system refused it (exit 1)."""

    option: str
    path: str
    message: str
    hint: str
    usage: bool = False

    def __str__(self) -> str:
        return f"{self.option} {self.path}: {self.message}"


def new_file_mode() -> int:
    """The mode `open()` gives a new file now: 0666 less the process's umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """Linux says it in /proc/self/status; elsewhere `os.umask` can only be read by setting it
    (and setting it back)."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii") as status,
    ):
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(temporary: str | Path, final: str | Path) -> None:
    """Rename a finished temporary file over `final`, with a new file's usual permissions."""
    os.chmod(temporary, new_file_mode())
    os.replace(temporary, final)


def check_file_output(path: str | Path, option: str = "--out") -> Path:
    """`path` as a file output, or the `OutputError` saying why it cannot be one. Creates nothing."""
    try:
        return _check_file(Path(path), option)
    except OSError as exc:  # a name too long, a loop of symbolic links, ...
        raise _system_error(option, str(path), exc) from None


def check_directory_output(path: str | Path, option: str = "--out") -> Path:
    """`path` as a directory output, or the `OutputError` saying why not. Creates nothing."""
    try:
        return _check_directory(Path(path), option)
    except OSError as exc:
        raise _system_error(option, str(path), exc) from None


def _check_file(path: Path, option: str) -> Path:
    shown = str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        mode = None
        if not isinstance(exc, NotADirectoryError):
            raise _system_error(option, shown, exc) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(
            option,
            shown,
            "this is a directory; the option names the file to write",
            f"name a file inside it, e.g. `{option} {path / 'NAME'}`",
            usage=True,
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(
            option,
            shown,
            f"this is {describe_file_kind(mode)}, not a file that can be replaced",
            "name a regular file (epicycle writes a new file and renames it into place)",
            usage=True,
        )
    _check_parents(path.parent, option, shown)
    return path


def _check_directory(path: Path, option: str) -> Path:
    shown = str(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(
                option,
                shown,
                "this is a file, and the option names a directory to write into",
                "choose a directory (existing or new), not a file",
                usage=True,
            )
        _check_writable(path, option, shown)
        return path
    _check_parents(path.parent, option, shown)
    return path


@contextlib.contextmanager
def output_directory(path: str | Path, option: str = "--out") -> Iterator[Path]:
    """Check `path` as a directory output, create it (with its parents), and remove what was
    created again if the block fails while the directories are still empty."""
    path = check_directory_output(path, option)
    created = _make_directories(path, option, str(path))
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


def write_file(path: str | Path, data: bytes | str, option: str = "--out") -> Path:
    """Write `data` (text is UTF-8) to `path`, all or nothing."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_with(path, lambda staged: staged.write_bytes(payload), option)


def write_with(path: str | Path, writer: Callable[[Path], object], option: str = "--out") -> Path:
    """Let `writer` write `path`'s content to a staged path of the same name in a private
    directory beside it, then rename what it wrote into place: `path` itself and any sibling files
    the writer added (ONNX's external `path.data`). A writer's own exception propagates; an OS
    error becomes an `OutputError`. Either way the staging directory and any parent directories
    created for it are gone afterwards."""
    path = check_file_output(path, option)
    shown = str(path)
    created = _make_directories(path.parent, option, shown)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        writer(staging / path.name)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            publish(produced, path.parent / produced.name)  # the named file last
    except OSError as exc:
        _discard(staging, created)
        raise _system_error(option, shown, exc) from None
    except BaseException:
        _discard(staging, created)
        raise
    _discard(staging, [])
    return path


# --------------------------------------------------------------------------- the checks


def _check_parents(parent: Path, option: str, shown: str) -> None:
    """The nearest existing ancestor of `parent` must be a writable directory, and the missing
    part below it must not climb with `..` (the OS resolves `a/..` only if `a` exists)."""
    missing: list[Path] = []
    ancestor = parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    climbing = [directory for directory in missing if directory.name == ".."]
    if climbing:
        raise OutputError(
            option,
            shown,
            f"`{climbing[-1].parent}` does not exist, so the `..` after it cannot be followed",
            "write the path without `..`, or create the directory first",
            usage=True,
        )
    if not ancestor.is_dir():
        raise OutputError(
            option,
            shown,
            f"`{ancestor}` is not a directory, so nothing can be written below it",
            "choose a path whose directories are directories",
            usage=True,
        )
    _check_writable(ancestor, option, shown)


def _check_writable(directory: Path, option: str, shown: str) -> None:
    """Asked of the system twice: `access` (permissions, a read-only mount), then by making and
    removing an empty directory there, because root passes `access` in /proc and /sys too."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(
            option,
            shown,
            f"cannot write in `{directory}` (permission denied or a read-only file system)",
            "choose a directory you can write to",
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".epicycle-probe-", dir=directory))
    except OSError as exc:
        raise OutputError(
            option,
            shown,
            f"cannot write in `{directory}`: {exc.strerror or exc}",
            _SYSTEM_HINT,
        ) from None


def _system_error(option: str, shown: str, exc: OSError) -> OutputError:
    where = f" (`{exc.filename}`)" if exc.filename and str(exc.filename) != shown else ""
    hint = (
        "shorten the path: a file or directory name has at most 255 bytes"
        if exc.errno == errno.ENAMETOOLONG
        else _SYSTEM_HINT
    )
    return OutputError(option, shown, f"cannot write: {exc.strerror or exc}{where}", hint)


_SYSTEM_HINT = (
    "choose a path on a disk you can write to (not /proc, /sys or a read-only mount), with free "
    "space"
)


# --------------------------------------------------------------------------- creating and undoing


def _make_directories(directory: Path, option: str, shown: str) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, deepest first."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe == probe.parent:
            break
        probe = probe.parent
    created: list[Path] = []
    try:
        for each in reversed(missing):
            each.mkdir()
            created.insert(0, each)
    except FileExistsError:  # made meanwhile (another process of the same run)
        pass
    except OSError as exc:
        _remove_empty(created)
        raise _system_error(option, shown, exc) from None
    return created


def _remove_empty(created: list[Path]) -> None:
    for directory in created:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def _discard(staging: Path | None, created: list[Path]) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_empty(created)
