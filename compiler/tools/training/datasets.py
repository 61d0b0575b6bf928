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

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from compiler.language.datafiles import declaration_conflict, format_of
from compiler.tools.data import (
    MAX_BYTES,
    character_ids,
    decode_text,
    held_out_tokens,
    mix_seed,
    read_data_file,
    window_starts,
)
from compiler.tools.training.file_formats import (
    ARRAYS_LIMIT,
    CSV_LIMIT,
    Table,
    read_csv,
    read_npz,
    read_parquet,
    read_safetensors,
    read_tokenizer,
    refuse,
    refuse_at,
    token_array,
)

if TYPE_CHECKING:
    from compiler.language.spec import TrainData
    from compiler.tools.training.ports import InputPort, Ports, TargetPort


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
        raise refuse(shown, conflict, "see the README's `Training data`")
    chosen = format_of(shown, source.format)
    _check_state_format(state, chosen, shown)
    if chosen in ("text", "tokens"):
        data = _load_stream(source, chosen, ports, val_fraction, state)
    else:
        data = _load_examples(source, chosen, ports, val_fraction)
    _check_state_agrees(state, data.state(), shown)
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
        ids, digest, dtype = token_array(shown, source.dtype)
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
    if ports.time:
        raise refuse(
            shown,
            f"{what} is one stream of tokens; this spec declares a time axis (`time:`), so its "
            "inputs and targets are arrays of shape (examples, time, tokens[, width])",
            "give the data as arrays named after the spec's inputs and outputs, in an .npz or "
            ".safetensors file (see the README's `A time axis`)",
        )
    fits = (
        len(ports.inputs) == 1
        and ports.inputs[0].kind == "tokens"
        and all(t.kind == "next_token" for t in ports.targets)
    )
    if not fits:
        raise refuse(
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
            raise refuse(
                shown,
                "the checkpoint being resumed read its text through a tokenizer",
                "resume with the same `tokenizer`",
            )
        vocabulary, ids = character_ids(text, shown, (state or {}).get("vocabulary"))
        if len(vocabulary) > port.vocab:
            raise refuse(
                shown,
                f"the text has {len(vocabulary)} distinct characters; input `{port.name}` has "
                f"`vocab: {port.vocab}`",
                f"set `vocab: {len(vocabulary)}` (or more) on input `{port.name}`",
            )
        info = f"UTF-8 characters ({len(vocabulary)} in the vocabulary)"
        return ids, digest, info, {"format": "text", "vocabulary": vocabulary}
    tokenizer, tokenizer_sha256 = read_tokenizer(source.tokenizer)
    if state and "vocabulary" in state:
        raise refuse(
            shown,
            "the checkpoint being resumed read its text as characters, not through a tokenizer",
            "resume without `tokenizer`",
        )
    if state and state.get("tokenizer", {}).get("sha256", tokenizer_sha256) != tokenizer_sha256:
        raise refuse(
            source.tokenizer,
            "this tokenizer is not the one the checkpoint being resumed was trained with "
            "(their SHA-256 differ)",
            "resume with the checkpoint's tokenizer file",
        )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > port.vocab:
        raise refuse(
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
            raise refuse(
                shown,
                f"token {at:,} is id {int(ids[at])}, outside the vocabulary of input "
                f"`{port.name}` (`vocab: {port.vocab}`, ids 0 to {port.vocab - 1})",
                f"set `vocab` on input `{port.name}` to the tokenizer's size, or check the dtype "
                "the file was written with",
            )


# --------------------------------------------------------------------------- examples


class ExampleArrays:
    """Per-port arrays of examples, the last `held` held out, served in seeded epochs."""

    def __init__(self, path, sha256, inputs, targets, held, format, mapping):
        self.path, self.sha256 = path, sha256
        self._inputs, self._targets = inputs, targets
        self._count = len(next(iter(inputs.values())))
        self._held, self._format, self._mapping = held, format, mapping
        self._permutations: dict[tuple[str, int, int], np.ndarray] = {}

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
            raise refuse(
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
    if ports.time and chosen in ("csv", "parquet"):
        raise refuse(
            shown,
            f"this spec declares a time axis (`time:`), and {chosen} columns hold one token axis "
            "per example, not a time axis beside it",
            "give the data as arrays of shape (examples, time, tokens[, width]) in an .npz or "
            ".safetensors file",
        )
    if chosen in ("csv", "parquet"):
        reader = read_csv if chosen == "csv" else read_parquet
        table = reader(raw, shown, _port_kinds(ports, source.arrays))
    else:
        table = (read_npz if chosen == "npz" else read_safetensors)(raw, shown)
    mapping = _mapping(ports, source.arrays, table, shown)
    inputs, targets = _port_arrays(ports, mapping, table, shown)
    count = len(next(iter(inputs.values())))
    held = max(int(count * val_fraction), 1)
    if count - held < 1:
        raise refuse(
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
        raise refuse(
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
            raise refuse(
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
    inputs, targets, lengths, steps = {}, {}, {}, {}
    time = ports.time
    for port in ports.inputs:
        name = mapping[port.name]
        array = _checked_input(port, name, table, port.name in shifted, time)
        if port.name in shifted:
            for target in ports.targets:
                if (
                    target.kind == "next_token"
                    and target.name not in mapping
                    and target.over == port.name
                ):
                    targets[target.name] = array[..., 1:]  # token ids: tokens are the last axis
            array = array[..., :-1]
        inputs[port.name] = array
        _note_axes(array, name, lengths, steps, time)
    for target in ports.targets:
        if target.name in targets:
            continue
        name = mapping[target.name]
        targets[target.name] = array = _checked_target(target, name, table, ports)
        _note_axes(array, name, lengths, steps, time)
    counts = {mapping.get(n, n): len(a) for n, a in {**inputs, **targets}.items()}
    _refuse_unequal(
        shown,
        counts,
        "the arrays hold different numbers of examples",
        "every array's first axis is the examples: give each the same number",
    )
    _refuse_unequal(
        shown,
        steps,
        "the arrays have different numbers of time steps",
        "the model reads every input and predicts every output at the same time steps (axis 1)",
    )
    _refuse_unequal(
        shown,
        lengths,
        "the per-token arrays have different numbers of tokens",
        "the model reads every input and predicts every output at the same tokens"
        + (
            " (a tokens input whose next ids are predicted holds one more token)" if shifted else ""
        ),
    )
    return inputs, targets


def _note_axes(array, name, lengths, steps, time) -> None:
    """Record an array's tokens (axis 1, or 2 after a time axis) and time steps (axis 1)."""
    tokens_axis = 2 if time else 1
    if array.ndim > tokens_axis:
        lengths[name] = array.shape[tokens_axis]
    if time:
        steps[name] = array.shape[1]


def _refuse_unequal(shown: str, sizes: dict[str, int], says: str, hint: str) -> None:
    """Every array agrees on one axis's size, or the file is refused, each array's size listed."""
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"`{n}` {size}" for n, size in sizes.items())
        raise refuse(shown, f"{says}: {listed}", hint)


def _checked_input(
    port: InputPort, name: str, table: Table, shifted: bool, time: bool
) -> np.ndarray:
    array = table.arrays[name]
    if port.kind == "tokens":
        expected = _layout(time, f"tokens{' + 1' if shifted else ''}")
        _check_ids(array, name, table, expected, port.vocab, f"input `{port.name}`", "vocab", time)
        _check_tokens(array, name, table, port.context + (1 if shifted else 0), shifted, time)
    else:
        _check_values(array, name, table, port.width, f"input `{port.name}`", time)
        _check_tokens(array, name, table, port.context, False, time)
    return array


def _checked_target(target: TargetPort, name: str, table: Table, ports: Ports) -> np.ndarray:
    array = table.arrays[name]
    time = ports.time
    if target.kind == "next_token":
        vocab = ports.input(target.over).vocab
        expected = _layout(time, "tokens")
        _check_ids(array, name, table, expected, vocab, f"input `{target.over}`", "vocab", time)
    elif target.kind == "classes":
        expected = (
            "(examples, time): one class id per example and time step"
            if time
            else "(examples,): one class id per example"
        )
        _check_ids(
            array, name, table, expected, target.classes, f"output `{target.name}`", "classes", time
        )
    else:
        _check_values(array, name, table, target.width, f"output `{target.name}`", time)
    return array


def _layout(time: bool, per_example: str) -> str:
    """The shape a port's array takes, as its error messages write it: a time axis (`time:`)
    adds the time steps after the examples."""
    return f"(examples, {'time, ' if time else ''}{per_example})"


def _check_ids(array, name, table, expected, limit, port, field_name, time=False) -> None:
    """Token or class ids: integers of the expected rank, each below the port's `limit`."""
    ndim = (1 if field_name == "classes" else 2) + int(time)
    _check_shape(array, name, table, ndim, expected, time)
    what = "class ids" if field_name == "classes" else "token ids"
    _check_integers(array, name, table, what)
    of = f"the {'classes' if field_name == 'classes' else 'vocabulary'} of {port}"
    _check_range(array, name, table, limit, f"{of} (`{field_name}: {limit}`)", field_name)


def _check_values(array, name, table, width, port, time=False) -> None:
    """Features or values: finite numbers `(examples, tokens, width)` (`(examples, time, tokens,
    width)` on a time axis)."""
    expected = _layout(time, f"tokens, {width}")
    _check_shape(array, name, table, 3 + int(time), expected, time)
    _check_width(array, name, table, width, f"{port} has `width: {width}`", expected)
    _check_finite(array, name, table)


def _check_shape(array, name, table, ndim, expected, time=False) -> None:
    if array.ndim != ndim or 0 in array.shape:
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has shape {tuple(array.shape)}; it should be {expected}",
            "the first axis is the examples, the second the time steps (the spec declares `time:`)"
            if time
            else "the first axis is the examples",
        )


def _check_width(array, name, table, width, says, expected) -> None:
    if array.shape[-1] != width:
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has {array.shape[-1]} values per token; {says}",
            f"give `{name}` the shape {expected}",
        )


def _check_tokens(array, name, table, most, shifted, time=False) -> None:
    tokens = array.shape[2 if time else 1]
    per = "tokens per time step" if time else "tokens per example"
    if tokens > most:
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has {tokens} {per}; the model "
            f"reads at most {most - (1 if shifted else 0)}"
            + (" (plus the one predicted)" if shifted else ""),
            "cut the examples to the spec's `context`, or raise it",
        )
    if shifted and tokens < 2:
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` has 1 token per {'time step' if time else 'example'}: "
            "no next token to predict",
            "give at least 2 tokens per example (the last is only predicted)",
        )


def _check_integers(array, name, table, what) -> None:
    if array.dtype.kind not in "iu":
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` holds {array.dtype}; {what} are integers",
            f"store `{name}` as an integer array (int64, int32, uint16...)",
        )


def _check_range(array, name, table, limit, of, field_name) -> None:
    bad = (array < 0) | (array >= limit)
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), array.shape)
        span, place = table.where(name, int(index[0]), tuple(int(i) for i in index[1:]))
        raise refuse_at(
            span,
            f"{place} is {int(array[index])}, outside {of} (ids 0 to {limit - 1})",
            f"check the data, or raise `{field_name}` in the spec",
        )


def _check_finite(array, name, table) -> None:
    if array.dtype.kind not in "iuf":
        raise refuse_at(
            table.where(name, 0, ())[0],
            f"{table.kind_of_name} `{name}` holds {array.dtype}; features and values are numbers",
            f"store `{name}` as a float array",
        )
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            index = np.unravel_index(int(np.argmax(bad)), array.shape)
            span, place = table.where(name, int(index[0]), tuple(int(i) for i in index[1:]))
            raise refuse_at(
                span,
                f"{place} is {array[index]}: training needs finite values",
                "remove or fill the example (NaN and inf make every loss NaN)",
            )


def _port_kinds(ports: Ports, declared: Mapping[str, str]) -> dict[str, str]:
    kinds = {declared.get(p.name, p.name): p.kind for p in ports.inputs}
    kinds.update({declared.get(t.name, t.name): t.kind for t in ports.targets})
    return kinds


# --------------------------------------------------------------------------- helpers


def _split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split is `train` or `val`, not {split!r}")
    return split


def _check_state_format(state: dict | None, chosen: str, shown: str) -> None:
    was = (state or {}).get("format")
    if was is not None and was != chosen:
        raise refuse(
            shown,
            f"the checkpoint being resumed was trained on `{was}` data; this file is `{chosen}`",
            "resume on data of the checkpoint's format, or start a new run",
        )


def _check_state_agrees(state: dict | None, now: dict, shown: str) -> None:
    """A resumed run reads its ports from the same arrays, and a `.bin` with the same dtype:
    anything else would train on other ids without a word."""
    for key, what in (("dtype", "token dtype"), ("arrays", "arrays for its ports")):
        if state and key in state and key in now and state[key] != now[key]:
            raise refuse(
                shown,
                f"the checkpoint being resumed read {what} {state[key]}; this run reads {now[key]}",
                f"declare the checkpoint's `{key}`, or start a new run",
            )
