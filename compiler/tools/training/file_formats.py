"""Reading each training-data format into named arrays, with located errors: a `tokenizers`
file, a token array (`.npy`, raw `.bin`, memory-mapped), and the example files (`.npz`,
`.safetensors`, `.parquet`, `.csv`). What the arrays must be for a spec is
`compiler.tools.training.datasets`' business; here a file is only read, and a file that cannot
be read is a `SpecError` at `file:line:col` saying what to do.

Every file is opened through a descriptor checked to be a regular file first
(`compiler.language.files.read_regular_file`, or `open_regular` for the memory-mapped ones), so a
FIFO or a device is refused before anything reads from it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.files import describe_file_kind
from compiler.tools.data import DATA_HINT, decode_text, read_data_file

ARRAYS_LIMIT = 2**33  # npz, safetensors and parquet are read into memory whole
CSV_LIMIT = 2**30  # CSV is parsed in Python: a larger table belongs in npz or parquet
TOKENIZER_LIMIT = 2**28
EXTRA = "install the optional extra: pip install 'epicycle[data]'"


def read_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise refuse(
            path, "reading text through a tokenizer needs the `tokenizers` package", EXTRA
        ) from None
    raw = read_data_file(path, limit=TOKENIZER_LIMIT, what="tokenizer file")
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust side raises a bare Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise refuse(
            path,
            f"not a `tokenizers` JSON file ({reason})",
            "save one with `Tokenizer.save(path)` (the `tokenizer.json` of a Hub model is one), "
            "or leave `tokenizer` out to read the text as characters",
        ) from None
    return tokenizer, hashlib.sha256(raw).hexdigest()


def token_array(shown: str, dtype: str | None) -> tuple[np.ndarray, str, str]:
    """A `.npy` or raw `.bin` of ids, memory-mapped from a descriptor that was checked to be a
    regular file (so a FIFO or a device cannot hang the read), and its SHA-256."""
    with open_regular(shown) as handle:
        digest = _file_sha256(handle)
        if Path(shown).suffix.lower() == ".npy":
            ids = _npy_memmap(handle, shown)
        else:
            ids = _bin_memmap(handle, shown, dtype or "uint16")
    if ids.ndim != 1:
        raise refuse(
            shown,
            f"the token array has shape {ids.shape}; a token stream is one flat array of ids",
            "save the ids as one 1-D array (nanoGPT's layout), or as examples in an .npz",
        )
    if ids.dtype.kind not in "iu":
        raise refuse(
            shown,
            f"the token array holds {ids.dtype}; token ids are integers (uint16 or uint32)",
            "save the ids as uint16 (a vocabulary up to 65,536) or uint32",
        )
    return ids, digest, str(ids.dtype)


def _file_sha256(handle) -> str:
    """Read in chunks (`hashlib.file_digest` is Python 3.11+), then rewound."""
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 24):
        digest.update(chunk)
    handle.seek(0)
    return digest.hexdigest()


def _npy_memmap(handle, shown: str) -> np.ndarray:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        if offset + dtype.itemsize * math.prod(shape) > os.fstat(handle.fileno()).st_size:
            raise ValueError("the file is shorter than its header says")
        if math.prod(shape) == 0:
            raise ValueError("it holds no ids")
        return np.memmap(
            handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )
    except (ValueError, OSError, EOFError) as exc:
        raise refuse(
            shown,
            f"not a readable .npy file ({exc})",
            "write it with `numpy.save`, or name a raw stream `.bin`",
        ) from None


def _bin_memmap(handle, shown: str, dtype: str) -> np.ndarray:
    size = os.fstat(handle.fileno()).st_size
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise refuse(shown, "the data file is empty", DATA_HINT)
    if size % itemsize:
        raise refuse(
            shown,
            f"the file has {size:,} bytes, not a whole number of {dtype} ids",
            "a .bin token array is a flat stream of uint16 (the default) or uint32 ids: declare "
            "`dtype` to match the file",
        )
    return np.memmap(handle, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


@contextmanager
def open_regular(shown: str) -> Iterator[BinaryIO]:
    """A binary file object over a descriptor opened without blocking and checked (fstat) to be
    a regular file before anything reads from it: what `np.memmap` maps."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        descriptor = os.open(shown, flags)
    except FileNotFoundError:
        raise refuse(shown, "no such data file", DATA_HINT) from None
    except OSError as exc:
        fifo = exc.errno == errno.ENXIO
        message = (
            f"the data file path is {describe_file_kind(stat.S_IFIFO)}"
            if fifo
            else f"cannot open the data file: {exc.strerror}"
        )
        raise refuse(shown, message, DATA_HINT) from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise refuse(
            shown,
            f"the data file path is {describe_file_kind(mode)}, not a regular file",
            DATA_HINT,
        )
    with os.fdopen(descriptor, "rb") as handle:
        yield handle


@dataclass
class Table:
    """Arrays read from an examples file, by name (first axis: examples), and how to point at
    one example of one of them in the file (CSV: its line; otherwise its index)."""

    arrays: dict[str, np.ndarray]
    listing: str  # what the file has, for an error about a missing name
    where: Callable[[str, int, tuple[int, ...]], tuple[Span, str]]
    kind_of_name: str = "array"


# --------------------------------------------------------------------------- file formats


def _indexed(kind: str, shown: str):
    def where(name: str, example: int, index: tuple[int, ...]) -> tuple[Span, str]:
        at = ", ".join(str(i) for i in (example, *index))
        return Span(shown, 1, 1), f"{kind} `{name}`[{at}]"

    return where


def _listing(arrays: Mapping[str, np.ndarray]) -> str:
    if not arrays:
        return "no arrays"
    return ", ".join(f"`{n}` {tuple(a.shape)} {a.dtype}" for n, a in arrays.items())


def _corrupt(shown: str, what: str, reason: object, hint: str) -> SpecError:
    text = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
    return refuse(shown, f"not a readable {what} file ({text})", hint)


def read_npz(raw: bytes, shown: str) -> Table:
    import zipfile

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise _corrupt(
            shown, ".npz", exc, "write it with `numpy.savez` (arrays, no objects)"
        ) from None
    return Table(arrays, _listing(arrays), _indexed("array", shown))


def read_safetensors(raw: bytes, shown: str) -> Table:
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except Exception as exc:  # SafetensorError, or a header that is not JSON
        raise _corrupt(
            shown, ".safetensors", exc, "write it with `safetensors.numpy.save_file`"
        ) from None
    arrays = {
        name: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for name, t in tensors.items()
    }
    return Table(arrays, _listing(arrays), _indexed("tensor", shown))


_COLUMN = re.compile(r"^(?P<name>.+?)\.(?P<first>\d+)(?:\.(?P<second>\d+))?$")


def _column_groups(columns: list[str]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Columns by the array they flatten: `ids.3` is `ids`[:, 3], `x.2.1` is `x`[:, 2, 1]; a
    column without indices is an array of its own."""
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for column in columns:
        match = _COLUMN.match(column)
        if match and match["name"] not in columns:
            index = tuple(int(v) for v in (match["first"], match["second"]) if v is not None)
            groups.setdefault(match["name"], []).append((column, index))
        else:
            groups.setdefault(column, []).append((column, ()))
    return groups


def _grid(name: str, members: list[tuple[str, tuple[int, ...]]], shown: str, span: Span):
    """The columns of a flattened array in index order, and the per-example shape; a missing or
    mixed index is an error naming it."""
    depths = {len(index) for _, index in members}
    if len(depths) > 1 or (0 in depths and len(members) > 1):
        raise refuse_at(
            span,
            f"the columns of `{name}` mix index depths ({', '.join(c for c, _ in members[:6])})",
            f"name them all `{name}.TOKEN` (token ids) or all `{name}.TOKEN.VALUE` (features)",
        )
    if depths == {0}:
        return [members[0][0]], ()
    shape = tuple(max(index[d] for _, index in members) + 1 for d in range(depths.pop()))
    by_index = {index: column for column, index in members}
    for index in np.ndindex(*shape):
        if index not in by_index:
            missing = ".".join(str(i) for i in (name, *index))
            raise refuse_at(
                span,
                f"column `{missing}` is missing: `{name}` has {len(members)} columns of "
                f"{math.prod(shape)} for shape {shape}",
                f"flatten `{name}` into one column per index, `{name}.0` onward",
            )
    return [by_index[index] for index in np.ndindex(*shape)], shape


def _features_shape(shape: tuple[int, ...], port_kind: str | None) -> tuple[int, ...]:
    """`x.w` columns of a features or values port are one token of `W` values."""
    return (1, *shape) if port_kind in ("features", "values") and len(shape) == 1 else shape


def read_csv(raw: bytes, shown: str, kinds: Mapping[str, str]) -> Table:
    """A header row, then one example per row; an array flattened over columns `name.i[.j]`."""
    text = decode_text(raw, shown).removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        header = next(reader, None)
        if not header:
            raise refuse(shown, "the CSV file has no header row", "start it with the column names")
        rows, lines = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise refuse_at(
                    Span(shown, reader.line_num, 1),
                    f"this row has {len(row)} field(s); the header has {len(header)}",
                    "give every row one value per column",
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise refuse_at(
            Span(shown, reader.line_num, 1), f"not readable CSV ({exc})", None
        ) from None
    cells = np.array(rows, dtype=str).reshape(len(rows), len(header))
    groups = _column_groups(header)
    arrays, columns_of = {}, {}
    for name, members in groups.items():
        if name not in kinds:
            continue  # a column no port reads is not parsed
        columns, shape = _grid(name, members, shown, Span(shown, 1, 1))
        shape = _features_shape(shape, kinds[name])
        integer = kinds[name] in ("tokens", "next_token", "classes")
        block = cells[:, [header.index(c) for c in columns]]
        arrays[name] = _parse_cells(block, integer, columns, lines, shown).reshape(
            len(rows), *shape
        )
        columns_of[name] = columns

    def where(name: str, example: int, index: tuple[int, ...]) -> tuple[Span, str]:
        line = lines[example] if lines else 1
        if not index or name not in columns_of:
            return Span(shown, line if index or example else 1, 1), f"column `{name}`"
        flat = int(np.ravel_multi_index(index, arrays[name].shape[1:]))
        column = columns_of[name][flat]
        return Span(shown, line, header.index(column) + 1), f"column `{column}`"

    listing = ", ".join(
        f"`{n}`" if len(m) == 1 and not m[0][1] else f"`{n}` ({len(m)} columns)"
        for n, m in groups.items()
    )
    return Table(arrays, listing or "no columns", where, "column")


def _parse_cells(block, integer, columns, lines, shown) -> np.ndarray:
    try:
        return block.astype(np.int64 if integer else np.float64)
    except ValueError:
        pass
    parse = int if integer else float
    for r, c in np.ndindex(*block.shape):  # only to find the first bad cell
        try:
            parse(block[r, c])
        except ValueError:
            what = "an integer" if integer else "a number"
            raise refuse_at(
                Span(shown, lines[r], 1),
                f"column `{columns[c]}` holds {str(block[r, c])!r}, not {what}",
                "every cell a port reads is a number (ids and class ids: integers)",
            ) from None
    raise refuse(shown, "the CSV cells could not be read as numbers", None)


def read_parquet(raw: bytes, shown: str, kinds: Mapping[str, str]) -> Table:
    """One example per row: a numeric column, a list column (lists of equal length; lists of
    lists for `(T, W)`), or an array flattened over columns `name.i[.j]` as in CSV."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise refuse(shown, "reading parquet needs the `pyarrow` package", EXTRA) from None
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _corrupt(
            shown, "parquet", exc, "write it with `pyarrow.parquet.write_table`"
        ) from None
    groups = _column_groups(table.column_names)
    arrays = {}
    for name, members in groups.items():
        if name not in kinds:
            continue  # a column no port reads is not converted
        columns, shape = _grid(name, members, shown, Span(shown, 1, 1))
        if not shape:
            arrays[name] = _parquet_column(table.column(columns[0]), columns[0], shown)
            continue
        block = np.stack([_parquet_column(table.column(c), c, shown) for c in columns], axis=1)
        arrays[name] = block.reshape(len(table), *_features_shape(shape, kinds[name]))
    listing = ", ".join(
        f"`{n}` {table.schema.field(n).type}"
        if len(m) == 1 and not m[0][1]
        else f"`{n}` ({len(m)} columns)"
        for n, m in groups.items()
    )
    return Table(arrays, listing or "no columns", _indexed("column", shown), "column")


def _parquet_column(column, name: str, shown: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise refuse(
            shown, f"column `{name}` is null at row {row}", "fill or drop the rows with nulls"
        )
    array = column.combine_chunks()
    shape = [len(array)]
    while (
        pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
    ):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.argmax(lengths != lengths[0]))
            raise refuse(
                shown,
                f"column `{name}` holds lists of different lengths (row 0: {lengths[0]}, row "
                f"{row}: {lengths[row]})",
                "pad or cut every example to the same number of tokens",
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
        if array.null_count:
            raise refuse(shown, f"column `{name}` holds nulls inside its lists", "fill them")
    try:
        values = array.to_numpy(zero_copy_only=False)
    except (pa.ArrowException, ValueError) as exc:
        raise refuse(shown, f"column `{name}` is not numeric ({exc})", "store numbers") from None
    if values.dtype.kind not in "iuf":
        raise refuse(
            shown,
            f"column `{name}` holds {array.type}; a port reads numbers",
            "store token ids and class ids as integers, features and values as floats",
        )
    return values.reshape(shape)


def refuse(shown: str, message: str, hint: str | None) -> SpecError:
    return SpecError([Diagnostic(Span(str(shown), 1, 1), message, hint)])


def refuse_at(span: Span, message: str, hint: str | None) -> SpecError:
    return SpecError([Diagnostic(span, message, hint)])
