"""Training data from local files, for every kind of input and output a spec declares.

Two shapes of data, checked against the spec's ports (`compiler.tools.training.ports`):

- **Streams** (a UTF-8 text, or a flat array of token ids as nanoGPT's `prepare.py` writes it:
  `.npy`, or raw `.bin` of `uint16`/`uint32`) serve a spec with one `tokens` input and `lm_head`
  outputs over it. A batch is windows of `context + 1` ids at random offsets: the input is
  `ids[:-1]`, every next-token target `ids[1:]`. The last `val_fraction` of the stream is held
  out. A text is read as characters (its vocabulary, the sorted characters, is stored with the
  checkpoint) or through a local `tokenizers` JSON file; token arrays are memory-mapped, so a
  file of billions of ids is never loaded whole.
- **Examples** (`.npz`, `.safetensors`, `.parquet`, `.csv`) hold one array (or group of columns)
  per port, first axis the examples: an input by its name, a target by its output's name, or as
  `arrays: {port: name}` maps them. A `next_token` target with no array of its own is the shift
  of its tokens input: the array holds `T + 1` ids, the model reads `ids[:, :-1]` and predicts
  `ids[:, 1:]`. The last `val_fraction` of the examples is held out (shuffle the file first if
  its order means something); batches walk seeded permutations, one per epoch, so every example
  is seen once an epoch.

Every batch is a pure function of `(split, index, size, seed)`, built by indexing (no Python loop
over examples): a resumed run reads exactly the batches an uninterrupted one would, and under
data parallelism every rank computes its own contiguous slice of the same global batch. Text
streams draw exactly the windows `compiler.tools.data.batch_at` draws.

In CSV (read with the standard library's `csv` module, numbers parsed by numpy) and parquet, one
row is one example. A class id is one column, `label`; a per-token array is flattened into
columns named by its indices: tokens `(N, T)` as `ids.0 ... ids.{T-1}`, features or values
`(N, T, W)` as `x.{t}.{w}` (or `x.{w}` for one token per example). Parquet also takes a list
column `ids` (lists of equal length; lists of lists for `(T, W)`).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from compiler.language.datafiles import declaration_conflict, format_of
from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.files import describe_file_kind
from compiler.tools.data import (
    DATA_HINT,
    MAX_BYTES,
    character_ids,
    decode_text,
    held_out_tokens,
    mix_seed,
    read_data_file,
    window_starts,
)

if TYPE_CHECKING:
    from compiler.language.spec import TrainData
    from compiler.tools.training.ports import InputPort, Ports, TargetPort

ARRAYS_LIMIT = 2**33  # npz, safetensors and parquet are read into memory whole
CSV_LIMIT = 2**30  # CSV is parsed in Python: a larger table belongs in npz or parquet
TOKENIZER_LIMIT = 2**28
EXTRA = "install the optional extra: pip install 'epicycle[data]'"


@dataclass(frozen=True)
class DataSource:
    """What the user declared: a file, its format (by suffix when None), a tokenizer for text, the
    dtype of a raw `.bin` token array, and which array or column feeds each port."""

    path: str
    format: str | None = None  # text | tokens | npz | safetensors | parquet | csv
    tokenizer: str | None = None  # a tokenizers JSON file (text only)
    dtype: str | None = None  # .bin token arrays: uint16 | uint32
    arrays: Mapping[str, str] = field(default_factory=dict)  # port name -> array/column name


class TrainingData(Protocol):
    path: str
    sha256: str

    def describe(self) -> str: ...

    def state(self) -> dict: ...

    def examples(self, split: str) -> int: ...

    def check_batch(self, split: str, size: int) -> None:
        """A located error when the split cannot fill a batch of `size` (examples: fewer than
        `size`; streams draw windows with replacement and take any size)."""

    def batch(
        self, split: str, index: int, size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...


def source_from_spec(data: TrainData, spec_file: str | Path) -> DataSource:
    """The spec's `train.data`, its relative paths read from the spec file's folder."""
    folder = Path(spec_file).parent

    def resolve(path: str | None) -> str | None:
        return None if path is None else str(folder / Path(path).expanduser())

    return DataSource(
        resolve(data.path), data.format, resolve(data.tokenizer), data.dtype, dict(data.arrays)
    )


def load_training_data(
    source: DataSource,
    ports: Ports,
    *,
    val_fraction: float,
    state: dict | None = None,
    batch: int | None = None,
) -> TrainingData:
    """The data `source` names, checked against `ports`; `state` (from a checkpoint) keeps the
    ids of a resumed run the same; with `batch`, a split too small for one batch is refused now
    rather than at the first step. Every refusal is a located `SpecError`."""
    shown = source.path
    conflict = declaration_conflict(
        shown, source.format, source.tokenizer, source.dtype, dict(source.arrays)
    )
    if conflict:
        raise _error(shown, conflict, "see the README's `Training data`")
    chosen = format_of(shown, source.format)
    _check_state_format(state, chosen, shown)
    if chosen in ("text", "tokens"):
        data = _load_stream(source, chosen, ports, val_fraction, state)
    else:
        data = _load_examples(source, chosen, ports, val_fraction)
    if batch is not None:
        for split in ("train", "val"):
            data.check_batch(split, batch)
    return data


# --------------------------------------------------------------------------- streams


class TokenStream:
    """A flat stream of ids (a text's, or a token array's, memory-mapped), cut into a training
    part and the held-out tail, served as random windows."""

    def __init__(self, path, sha256, ids, held, port, targets, info, state):
        self.path, self.sha256 = path, sha256
        self._ids, self._held, self._context = ids, held, port.context
        self._input, self._targets = port.name, targets
        self._info, self._state = info, state

    def describe(self) -> str:
        return (
            f"{self.path}: {self._info}, {len(self._ids):,} ids "
            f"({len(self._ids) - self._held:,} train, {self._held:,} validation)"
        )

    def state(self) -> dict:
        return dict(self._state)

    def _part(self, split: str) -> np.ndarray:
        return (
            self._ids[: len(self._ids) - self._held]
            if split == "train"
            else self._ids[-self._held :]
        )

    def examples(self, split: str) -> int:
        """Windows of `context + 1` ids the split holds (their starting offsets)."""
        return len(self._part(_split(split))) - self._context

    def check_batch(self, split: str, size: int) -> None:
        """Any batch size works: windows are drawn with replacement."""

    def batch(self, split, index, size, seed, shard=(0, 1)):
        part = self._part(_split(split))
        starts = window_starts(len(part), index, size, self._context, seed, shard).numpy()
        rows = torch.from_numpy(
            part[starts[:, None] + np.arange(self._context + 1)].astype(np.int64)
        )
        x, y = rows[:, :-1], rows[:, 1:]
        return {self._input: x}, {name: y for name in self._targets}


def _load_stream(source, chosen, ports, val_fraction, state) -> TokenStream:
    shown = source.path
    port, targets = _stream_ports(ports, chosen, shown)
    if chosen == "text":
        ids, digest, info, kept = _text_ids(source, port, state)
        unit = "characters" if source.tokenizer is None else "tokens"
    else:
        ids, digest, dtype = _token_array(shown, source.dtype)
        _check_ids_below(ids, port, shown)
        info, kept, unit = f"{dtype} token ids", {"format": "tokens", "dtype": dtype}, "tokens"
    held = held_out_tokens(len(ids), val_fraction, port.context, shown, unit)
    return TokenStream(shown, digest, ids, held, port, targets, info, kept)


def _stream_ports(ports: Ports, chosen: str, shown: str) -> tuple[InputPort, tuple[str, ...]]:
    """A stream feeds one tokens input and next-token targets over it; anything else needs
    arrays named after its ports."""
    what = "a text" if chosen == "text" else "a token array"
    inputs = ", ".join(f"`{p.name}` ({p.kind})" for p in ports.inputs)
    outputs = ", ".join(f"`{t.name}` ({t.kind})" for t in ports.targets)
    fits = (
        len(ports.inputs) == 1
        and ports.inputs[0].kind == "tokens"
        and all(t.kind == "next_token" for t in ports.targets)
    )
    if not fits:
        raise _error(
            shown,
            f"{what} serves a spec with one tokens input and lm_head outputs; this spec's inputs "
            f"are {inputs} and its outputs {outputs}",
            "give the data as arrays named after the spec's inputs and outputs, in an .npz, "
            ".safetensors, .parquet or .csv file (see the README's `Training data`)",
        )
    return ports.inputs[0], tuple(t.name for t in ports.targets)


def _text_ids(source: DataSource, port: InputPort, state: dict | None):
    shown = source.path
    raw = read_data_file(shown, limit=MAX_BYTES)
    digest = hashlib.sha256(raw).hexdigest()
    text = decode_text(raw, shown)
    if source.tokenizer is None:
        if state and "tokenizer" in state:
            raise _error(
                shown,
                "the checkpoint being resumed read its text through a tokenizer",
                "resume with the same `tokenizer`",
            )
        vocabulary, ids = character_ids(text, shown, (state or {}).get("vocabulary"))
        if len(vocabulary) > port.vocab:
            raise _error(
                shown,
                f"the text has {len(vocabulary)} distinct characters; input `{port.name}` has "
                f"`vocab: {port.vocab}`",
                f"set `vocab: {len(vocabulary)}` (or more) on input `{port.name}`",
            )
        info = f"UTF-8 characters ({len(vocabulary)} in the vocabulary)"
        return ids, digest, info, {"format": "text", "vocabulary": vocabulary}
    tokenizer, tokenizer_sha256 = _read_tokenizer(source.tokenizer)
    if state and "vocabulary" in state:
        raise _error(
            shown,
            "the checkpoint being resumed read its text as characters, not through a tokenizer",
            "resume without `tokenizer`",
        )
    if state and state.get("tokenizer", {}).get("sha256", tokenizer_sha256) != tokenizer_sha256:
        raise _error(
            source.tokenizer,
            "this tokenizer is not the one the checkpoint being resumed was trained with "
            "(their SHA-256 differ)",
            "resume with the checkpoint's tokenizer file",
        )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > port.vocab:
        raise _error(
            source.tokenizer,
            f"the tokenizer has {size:,} tokens; input `{port.name}` has `vocab: {port.vocab}`",
            f"set `vocab: {size}` (or more) on input `{port.name}`",
        )
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)
    kept = {
        "format": "text",
        "tokenizer": {"file": source.tokenizer, "sha256": tokenizer_sha256, "tokens": size},
    }
    return ids, digest, f"tokenized by {source.tokenizer} ({size:,} tokens)", kept


def _read_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise _error(
            path, "reading text through a tokenizer needs the `tokenizers` package", EXTRA
        ) from None
    raw = read_data_file(path, limit=TOKENIZER_LIMIT, what="tokenizer file")
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust side raises a bare Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _error(
            path,
            f"not a `tokenizers` JSON file ({reason})",
            "save one with `Tokenizer.save(path)` (the `tokenizer.json` of a Hub model is one), "
            "or leave `tokenizer` out to read the text as characters",
        ) from None
    return tokenizer, hashlib.sha256(raw).hexdigest()


def _token_array(shown: str, dtype: str | None) -> tuple[np.ndarray, str, str]:
    """A `.npy` or raw `.bin` of ids, memory-mapped from a descriptor that was checked to be a
    regular file (so a FIFO or a device cannot hang the read), and its SHA-256."""
    with _open_regular(shown) as handle:
        digest = _file_sha256(handle)
        if Path(shown).suffix.lower() == ".npy":
            ids = _npy_memmap(handle, shown)
        else:
            ids = _bin_memmap(handle, shown, dtype or "uint16")
    if ids.ndim != 1:
        raise _error(
            shown,
            f"the token array has shape {ids.shape}; a token stream is one flat array of ids",
            "save the ids as one 1-D array (nanoGPT's layout), or as examples in an .npz",
        )
    if ids.dtype.kind not in "iu":
        raise _error(
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
        if offset + dtype.itemsize * int(np.prod(shape)) > os.fstat(handle.fileno()).st_size:
            raise ValueError("the file is shorter than its header says")
        if int(np.prod(shape)) == 0:
            raise ValueError("it holds no ids")
        return np.memmap(
            handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )
    except (ValueError, OSError, EOFError) as exc:
        raise _error(
            shown,
            f"not a readable .npy file ({exc})",
            "write it with `numpy.save`, or name a raw stream `.bin`",
        ) from None


def _bin_memmap(handle, shown: str, dtype: str) -> np.ndarray:
    size = os.fstat(handle.fileno()).st_size
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise _error(shown, "the data file is empty", DATA_HINT)
    if size % itemsize:
        raise _error(
            shown,
            f"the file has {size:,} bytes, not a whole number of {dtype} ids",
            "a .bin token array is a flat stream of uint16 (the default) or uint32 ids: declare "
            "`dtype` to match the file",
        )
    return np.memmap(handle, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def _check_ids_below(ids: np.ndarray, port: InputPort, shown: str) -> None:
    """Every id of a token array indexes the input's embedding; scanned in chunks, so a mapped
    file is read once and never held whole."""
    if ids.dtype.kind == "u" and np.iinfo(ids.dtype).max < port.vocab:
        return
    chunk = 1 << 24
    for begin in range(0, len(ids), chunk):
        part = ids[begin : begin + chunk]
        bad = (part < 0) | (part >= port.vocab)
        if bad.any():
            at = begin + int(np.argmax(bad))
            raise _error(
                shown,
                f"token {at:,} is id {int(ids[at])}, outside the vocabulary of input "
                f"`{port.name}` (`vocab: {port.vocab}`, ids 0 to {port.vocab - 1})",
                f"set `vocab` on input `{port.name}` to the tokenizer's size, or check the dtype "
                "the file was written with",
            )


class _open_regular:
    """A binary file object over a descriptor opened without blocking and checked (fstat) to be
    a regular file before anything reads from it."""

    def __init__(self, shown: str):
        self.shown = shown

    def __enter__(self):
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
        try:
            descriptor = os.open(self.shown, flags)
        except FileNotFoundError:
            raise _error(self.shown, "no such data file", DATA_HINT) from None
        except OSError as exc:
            kind = describe_file_kind(stat.S_IFIFO) if exc.errno == errno.ENXIO else None
            message = (
                f"the data file path is {kind}"
                if kind
                else f"cannot open the data file: {exc.strerror}"
            )
            raise _error(self.shown, message, DATA_HINT) from None
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            raise _error(
                self.shown,
                f"the data file path is {describe_file_kind(mode)}, not a regular file",
                DATA_HINT,
            )
        self.handle = os.fdopen(descriptor, "rb")
        return self.handle

    def __exit__(self, *exc):
        self.handle.close()


# --------------------------------------------------------------------------- examples


@dataclass
class Table:
    """Arrays read from an examples file, by name (first axis: examples), and how to point at
    one example of one of them in the file (CSV: its line; otherwise its index)."""

    arrays: dict[str, np.ndarray]
    listing: str  # what the file has, for an error about a missing name
    where: Callable[[str, int, tuple[int, ...]], tuple[Span, str]]
    kind_of_name: str = "array"


class ExampleArrays:
    """Per-port arrays of examples, the last `held` held out, served in seeded epochs."""

    def __init__(self, path, sha256, inputs, targets, held, format, mapping):
        self.path, self.sha256 = path, sha256
        self._inputs, self._targets = inputs, targets
        self._count = len(next(iter(inputs.values())))
        self._held, self._format, self._mapping = held, format, mapping
        self._permutations: dict[tuple[int, int, int], Tensor] = {}

    def describe(self) -> str:
        return (
            f"{self.path}: {self._format} arrays ({', '.join(self._shapes())}), "
            f"{self._count:,} examples "
            f"({self._count - self._held:,} train, {self._held:,} validation)"
        )

    def _shapes(self) -> list[str]:
        arrays = {**self._inputs, **self._targets}
        return [f"{n} {tuple(a.shape[1:])}" for n, a in arrays.items()]

    def state(self) -> dict:
        return {"format": self._format, "arrays": dict(self._mapping)}

    def examples(self, split: str) -> int:
        return self._count - self._held if _split(split) == "train" else self._held

    def check_batch(self, split: str, size: int) -> None:
        count = self.examples(split)
        if size > count:
            part = "training part" if split == "train" else "validation part"
            raise _error(
                self.path,
                f"the {part} has {count} example(s); a batch takes {size}",
                "use a smaller `batch`, a different `val_fraction`, or more examples",
            )

    def batch(self, split, index, size, seed, shard=(0, 1)):
        split = _split(split)
        self.check_batch(split, size)
        rows = self._rows(split, index, size, seed, shard)
        if split == "val":
            rows = rows + (self._count - self._held)
        return (
            {name: _gather(array, rows) for name, array in self._inputs.items()},
            {name: _gather(array, rows) for name, array in self._targets.items()},
        )

    def _rows(self, split, index, size, seed, shard) -> np.ndarray:
        """Rows of global batch `index` for shard `(rank, world)`: positions `index * size ...` of
        an endless walk through the split, one seeded permutation per epoch."""
        rank, world = shard
        count, per_rank = self.examples(split), size // world
        positions = index * size + rank * per_rank + np.arange(per_rank)
        epochs, within = np.divmod(positions, count)
        rows = np.empty(per_rank, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():  # one or two epochs (a batch <= the split)
            chosen = epochs == epoch
            rows[chosen] = self._permutation(split, count, seed, epoch)[within[chosen]]
        return rows

    def _permutation(self, split: str, count: int, seed: int, epoch: int) -> np.ndarray:
        key = (split, seed, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 8:
                self._permutations.pop(next(iter(self._permutations)))
            generator = torch.Generator().manual_seed(mix_seed(seed, f"{split}:epoch:{epoch}"))
            self._permutations[key] = torch.randperm(count, generator=generator).numpy()
        return self._permutations[key]


def _gather(array: np.ndarray, rows: np.ndarray) -> Tensor:
    picked = np.take(array, rows, axis=0)
    dtype = np.int64 if array.dtype.kind in "iu" else np.float32
    return torch.from_numpy(np.ascontiguousarray(picked, dtype=dtype))


def _load_examples(source: DataSource, chosen: str, ports: Ports, val_fraction: float):
    shown = source.path
    limit = CSV_LIMIT if chosen == "csv" else ARRAYS_LIMIT
    raw = read_data_file(shown, limit=limit)
    digest = hashlib.sha256(raw).hexdigest()
    if chosen in ("csv", "parquet"):
        reader = _read_csv if chosen == "csv" else _read_parquet
        table = reader(raw, shown, ports, source.arrays)
    else:
        table = (_read_npz if chosen == "npz" else _read_safetensors)(raw, shown)
    mapping = _mapping(ports, source.arrays, table, shown)
    inputs, targets = _port_arrays(ports, mapping, table, shown)
    count = len(next(iter(inputs.values())))
    held = max(int(count * val_fraction), 1)
    if count - held < 1:
        raise _error(
            shown,
            f"the data file has {count} example(s): too few for a training part and a "
            f"validation part of {held}",
            "add examples (or lower `val_fraction`)",
        )
    return ExampleArrays(shown, digest, inputs, targets, held, chosen, mapping)


def _mapping(ports: Ports, declared: Mapping[str, str], table: Table, shown: str) -> dict[str, str]:
    """Which array feeds each port: the declared name, else the port's own. A next-token target
    without an array of its own is left out: it is its input, shifted."""
    names = [p.name for p in ports.inputs] + [t.name for t in ports.targets]
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise _error(
            shown,
            f"`arrays` maps {', '.join(f'`{n}`' for n in unknown)}, which the spec has no input "
            f"or output of; it has {', '.join(f'`{n}`' for n in names)}",
            "map the spec's input and output names to the file's arrays",
        )
    mapping = {}
    for port in ports.inputs + ports.targets:
        name = declared.get(port.name, port.name)
        shifted = getattr(port, "kind", None) == "next_token" and port.name not in declared
        if name not in table.arrays:
            if shifted:
                continue
            role = "input" if port in ports.inputs else "output"
            raise _error(
                shown,
                f"the data file has no {table.kind_of_name} `{name}` for {role} `{port.name}`; "
                f"it has {table.listing}",
                f"name one `{port.name}`, or map it: `arrays: {{{port.name}: NAME}}`"
                if name == port.name
                else f"`arrays` maps `{port.name}` to `{name}`: name one of the file's",
            )
        mapping[port.name] = name
    return mapping


def _port_arrays(ports: Ports, mapping: dict[str, str], table: Table, shown: str):
    """Each port's array, checked (shape, dtype, finite values, ids in range) and, for a
    next-token target with no array, cut from its input: `ids[:, :-1]` in, `ids[:, 1:]` out."""
    shifted = {t.over for t in ports.targets if t.kind == "next_token" and t.name not in mapping}
    inputs, targets, lengths = {}, {}, {}
    for port in ports.inputs:
        name = mapping[port.name]
        array = _checked_input(port, name, table, port.name in shifted)
        if port.name in shifted:
            for target in ports.targets:
                if (
                    target.kind == "next_token"
                    and target.name not in mapping
                    and target.over == port.name
                ):
                    targets[target.name] = array[:, 1:]
            array = array[:, :-1]
        inputs[port.name] = array
        if array.ndim >= 2:
            lengths[name] = array.shape[1]
    for target in ports.targets:
        if target.name in targets:
            continue
        name = mapping[target.name]
        targets[target.name] = array = _checked_target(target, name, table, ports)
        if array.ndim >= 2:
            lengths[name] = array.shape[1]
    counts = {mapping.get(n, n): len(a) for n, a in {**inputs, **targets}.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"`{n}` {c}" for n, c in counts.items())
        raise _error(
            shown,
            f"the arrays hold different numbers of examples: {listed}",
            "every array's first axis is the examples: give each the same number",
        )
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"`{n}` {t}" for n, t in lengths.items())
        raise _error(
            shown,
            f"the per-token arrays have different numbers of tokens: {listed}",
            "the model reads every input and predicts every output at the same tokens"
            + (
                " (a tokens input whose next ids are predicted holds one more token)"
                if shifted
                else ""
            ),
        )
    return inputs, targets


def _checked_input(port: InputPort, name: str, table: Table, shifted: bool) -> np.ndarray:
    array = table.arrays[name]
    if port.kind == "tokens":
        expected = f"(examples, tokens{' + 1' if shifted else ''})"
        _check_ids(array, name, table, expected, port.vocab, f"input `{port.name}`", "vocab")
        _check_tokens(array, name, table, port.context + (1 if shifted else 0), shifted)
    else:
        _check_values(array, name, table, port.width, f"input `{port.name}`")
        _check_tokens(array, name, table, port.context, False)
    return array


def _checked_target(target: TargetPort, name: str, table: Table, ports: Ports) -> np.ndarray:
    array = table.arrays[name]
    if target.kind == "next_token":
        vocab = ports.input(target.over).vocab
        _check_ids(
            array, name, table, "(examples, tokens)", vocab, f"input `{target.over}`", "vocab"
        )
    elif target.kind == "classes":
        expected = "(examples,): one class id per example"
        _check_ids(
            array, name, table, expected, target.classes, f"output `{target.name}`", "classes"
        )
    else:
        _check_values(array, name, table, target.width, f"output `{target.name}`")
    return array


def _check_ids(array, name, table, expected, limit, port, field_name) -> None:
    """Token or class ids: integers of the expected rank, each below the port's `limit`."""
    _check_shape(array, name, table, 1 if field_name == "classes" else 2, expected)
    what = "class ids" if field_name == "classes" else "token ids"
    _check_integers(array, name, table, what)
    of = f"the {'classes' if field_name == 'classes' else 'vocabulary'} of {port}"
    _check_range(array, name, table, limit, f"{of} (`{field_name}: {limit}`)", field_name)


def _check_values(array, name, table, width, port) -> None:
    """Features or values: finite numbers `(examples, tokens, width)`."""
    _check_shape(array, name, table, 3, f"(examples, tokens, {width})")
    _check_width(array, name, table, width, f"{port} has `width: {width}`")
    _check_finite(array, name, table)


def _check_shape(array, name, table, ndim, expected) -> None:
    if array.ndim != ndim or 0 in array.shape:
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has shape {tuple(array.shape)}; it should be {expected}",
            "the first axis is the examples",
        )


def _check_width(array, name, table, width, says) -> None:
    if array.shape[2] != width:
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has {array.shape[2]} values per token; {says}",
            f"give `{name}` the shape (examples, tokens, {width})",
        )


def _check_tokens(array, name, table, most, shifted) -> None:
    if array.shape[1] > most:
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has {array.shape[1]} tokens per example; the model "
            f"reads at most {most - (1 if shifted else 0)}"
            + (" (plus the one predicted)" if shifted else ""),
            "cut the examples to the spec's `context`, or raise it",
        )
    if shifted and array.shape[1] < 2:
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has 1 token per example: no next token to predict",
            "give at least 2 tokens per example (the last is only predicted)",
        )


def _check_integers(array, name, table, what) -> None:
    if array.dtype.kind not in "iu":
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` holds {array.dtype}; {what} are integers",
            f"store `{name}` as an integer array (int64, int32, uint16...)",
        )


def _check_range(array, name, table, limit, of, field_name) -> None:
    bad = (array < 0) | (array >= limit)
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), array.shape)
        span, place = table.where(name, int(index[0]), tuple(int(i) for i in index[1:]))
        raise _error_at(
            span,
            f"{place} is {int(array[index])}, outside {of} (ids 0 to {limit - 1})",
            f"check the data, or raise `{field_name}` in the spec",
        )


def _check_finite(array, name, table) -> None:
    if array.dtype.kind not in "iuf":
        raise _error_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` holds {array.dtype}; features and values are numbers",
            f"store `{name}` as a float array",
        )
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            index = np.unravel_index(int(np.argmax(bad)), array.shape)
            span, place = table.where(name, int(index[0]), tuple(int(i) for i in index[1:]))
            raise _error_at(
                span,
                f"{place} is {array[index]}: training needs finite values",
                "remove or fill the example (NaN and inf make every loss NaN)",
            )


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
    return _error(shown, f"not a readable {what} file ({text})", hint)


def _read_npz(raw: bytes, shown: str) -> Table:
    import zipfile

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise _corrupt(
            shown, ".npz", exc, "write it with `numpy.savez` (arrays, no objects)"
        ) from None
    return Table(arrays, _listing(arrays), _indexed("array", shown))


def _read_safetensors(raw: bytes, shown: str) -> Table:
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
        raise _error_at(
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
            raise _error_at(
                span,
                f"column `{missing}` is missing: `{name}` has {len(members)} columns of "
                f"{int(np.prod(shape))} for shape {shape}",
                f"flatten `{name}` into one column per index, `{name}.0` onward",
            )
    return [by_index[index] for index in np.ndindex(*shape)], shape


def _features_shape(shape: tuple[int, ...], port_kind: str | None) -> tuple[int, ...]:
    """`x.w` columns of a features or values port are one token of `W` values."""
    return (1, *shape) if port_kind in ("features", "values") and len(shape) == 1 else shape


def _port_kinds(ports: Ports, declared: Mapping[str, str]) -> dict[str, str]:
    kinds = {declared.get(p.name, p.name): p.kind for p in ports.inputs}
    kinds.update({declared.get(t.name, t.name): t.kind for t in ports.targets})
    return kinds


def _read_csv(raw: bytes, shown: str, ports: Ports, declared: Mapping[str, str]) -> Table:
    """A header row, then one example per row; an array flattened over columns `name.i[.j]`."""
    text = decode_text(raw, shown)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise _error(shown, "the CSV file has no header row", "start it with the column names")
        rows, lines = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise _error_at(
                    Span(shown, reader.line_num, 1),
                    f"this row has {len(row)} field(s); the header has {len(header)}",
                    "give every row one value per column",
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise _error_at(
            Span(shown, reader.line_num, 1), f"not readable CSV ({exc})", None
        ) from None
    cells = np.array(rows, dtype=str).reshape(len(rows), len(header))
    kinds = _port_kinds(ports, declared)
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
            raise _error_at(
                Span(shown, lines[r], 1),
                f"column `{columns[c]}` holds {str(block[r, c])!r}, not {what}",
                "every cell a port reads is a number (ids and class ids: integers)",
            ) from None
    raise _error(shown, "the CSV cells could not be read as numbers", None)


def _read_parquet(raw: bytes, shown: str, ports: Ports, declared: Mapping[str, str]) -> Table:
    """One example per row: a numeric column, a list column (lists of equal length; lists of
    lists for `(T, W)`), or an array flattened over columns `name.i[.j]` as in CSV."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _error(shown, "reading parquet needs the `pyarrow` package", EXTRA) from None
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _corrupt(
            shown, "parquet", exc, "write it with `pyarrow.parquet.write_table`"
        ) from None
    kinds = _port_kinds(ports, declared)
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
        raise _error(
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
            raise _error(
                shown,
                f"column `{name}` holds lists of different lengths (row 0: {lengths[0]}, row "
                f"{row}: {lengths[row]})",
                "pad or cut every example to the same number of tokens",
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
        if array.null_count:
            raise _error(shown, f"column `{name}` holds nulls inside its lists", "fill them")
    try:
        values = array.to_numpy(zero_copy_only=False)
    except (pa.ArrowException, ValueError) as exc:
        raise _error(shown, f"column `{name}` is not numeric ({exc})", "store numbers") from None
    if values.dtype.kind not in "iuf":
        raise _error(
            shown,
            f"column `{name}` holds {array.type}; a port reads numbers",
            "store token ids and class ids as integers, features and values as floats",
        )
    return values.reshape(shape)


# --------------------------------------------------------------------------- helpers


def _split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split is `train` or `val`, not {split!r}")
    return split


def _check_state_format(state: dict | None, chosen: str, shown: str) -> None:
    was = (state or {}).get("format")
    if was is not None and was != chosen:
        raise _error(
            shown,
            f"the checkpoint being resumed was trained on `{was}` data; this file is `{chosen}`",
            "resume on data of the checkpoint's format, or start a new run",
        )


def _error(shown: str, message: str, hint: str | None) -> SpecError:
    return SpecError([Diagnostic(Span(str(shown), 1, 1), message, hint)])


def _error_at(span: Span, message: str, hint: str | None) -> SpecError:
    return SpecError([Diagnostic(span, message, hint)])
