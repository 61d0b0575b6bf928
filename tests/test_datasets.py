"""Training data from local files (`compiler.tools.training.datasets`): every format, checked
against the spec's ports, served as batches that are a pure function of `(seed, index)`.

    streams:  text (characters or a tokenizers file), .npy / .bin token arrays
    examples: .npz, .safetensors, .parquet, .csv, arrays named after the inputs and outputs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compiler
from compiler.language.diagnostics import SpecError
from compiler.tools.data import batch_at, load_corpus
from compiler.tools.training.datasets import DataSource, load_training_data, source_from_spec
from compiler.tools.training.ports import InputPort, Ports, TargetPort

LANGUAGE = Ports(
    (InputPort("tokens", "tokens", 16, vocab=70),),
    (TargetPort("logits", "next_token", over="tokens"),),
)
TABULAR = Ports(  # features in; a class and per-token values out
    (InputPort("x", "features", 16, width=3),),
    (TargetPort("label", "classes", classes=4), TargetPort("y", "values", width=2)),
)
EXAMPLES, TOKENS = 40, 5


def tabular_arrays() -> dict[str, np.ndarray]:
    """Example `i` carries `i` in every feature, so a batch row says which example it is."""
    i = np.arange(EXAMPLES, dtype=np.float32)
    return {
        "x": np.broadcast_to(i[:, None, None], (EXAMPLES, TOKENS, 3)).copy(),
        "label": (np.arange(EXAMPLES) % 4).astype(np.int64),
        "y": (i[:, None, None] * 10 + np.arange(2)).repeat(TOKENS, axis=1).astype(np.float32),
    }


def load(path, ports=TABULAR, val_fraction=0.25, **declared):
    return load_training_data(DataSource(str(path), **declared), ports, val_fraction=val_fraction)


def refused(path, ports=TABULAR, val_fraction=0.25, **declared) -> str:
    with pytest.raises(SpecError) as info:
        load(path, ports, val_fraction, **declared)
    return info.value.format()


# --------------------------------------------------------------------------- writers


def write_npz(path: Path, arrays) -> Path:
    np.savez(path, **arrays)
    return path


def write_safetensors(path: Path, arrays) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


def flat_columns(arrays) -> dict[str, np.ndarray]:
    """`x` (N, T, W) as columns `x.t.w`, `label` (N,) as `label`: the CSV and parquet layout."""
    columns = {}
    for name, array in arrays.items():
        for index in np.ndindex(*array.shape[1:]):
            columns[".".join(map(str, (name, *index)))] = array[(slice(None), *index)]
    return columns


def write_csv(path: Path, arrays) -> Path:
    columns = flat_columns(arrays)
    lines = [",".join(columns)]
    lines += [",".join(str(c[r]) for c in columns.values()) for r in range(EXAMPLES)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, arrays) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(flat_columns(arrays)), path)
    return path


def write_parquet_lists(path: Path, arrays) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({n: a.tolist() for n, a in arrays.items()}), path)
    return path


WRITERS = {
    "data.npz": write_npz,
    "data.safetensors": write_safetensors,
    "data.csv": write_csv,
    "data.parquet": write_parquet,
    "lists.parquet": write_parquet_lists,
}


# --------------------------------------------------------------------------- example files


@pytest.mark.parametrize("name", WRITERS)
def test_every_examples_format_round_trips_its_arrays(tmp_path, name):
    arrays = tabular_arrays()
    data = load(WRITERS[name](tmp_path / name, arrays))
    assert (data.examples("train"), data.examples("val")) == (30, 10)
    inputs, targets = data.batch("train", 0, 8, seed=0)
    rows = inputs["x"][:, 0, 0].long().numpy()  # which example each row is
    assert inputs["x"].dtype == torch.float32 and targets["label"].dtype == torch.int64
    assert torch.equal(inputs["x"], torch.from_numpy(arrays["x"][rows]))
    assert torch.equal(targets["label"], torch.from_numpy(arrays["label"][rows]))
    assert torch.equal(targets["y"], torch.from_numpy(arrays["y"][rows]))


def test_an_epoch_of_batches_sees_every_training_example_once_and_no_held_out_one(tmp_path):
    data = load(write_npz(tmp_path / "d.npz", tabular_arrays()))
    seen = [data.batch("train", i, 6, seed=3)[0]["x"][:, 0, 0] for i in range(5)]  # 30 examples
    assert sorted(torch.cat(seen).long().tolist()) == list(range(30))
    held = [data.batch("val", -1 - i, 5, seed=3)[0]["x"][:, 0, 0] for i in range(2)]
    assert sorted(torch.cat(held).long().tolist()) == list(range(30, 40))  # the last quarter


def test_example_batches_are_a_function_of_seed_and_index_and_shards_tile_them(tmp_path):
    data = load(write_npz(tmp_path / "d.npz", tabular_arrays()))
    x = data.batch("train", 7, 8, seed=1)[0]["x"]
    assert torch.equal(x, data.batch("train", 7, 8, seed=1)[0]["x"])  # resume-exact
    assert not torch.equal(x, data.batch("train", 8, 8, seed=1)[0]["x"])
    assert not torch.equal(x, data.batch("train", 7, 8, seed=2)[0]["x"])
    shards = [data.batch("train", 7, 8, seed=1, shard=(rank, 4))[0]["x"] for rank in range(4)]
    assert torch.equal(torch.cat(shards), x)  # each rank its contiguous slice


def test_arrays_maps_ports_to_names_of_the_file(tmp_path):
    arrays = tabular_arrays()
    path = write_npz(
        tmp_path / "d.npz", {"features": arrays["x"], "class": arrays["label"], "y": arrays["y"]}
    )
    data = load(path, arrays={"x": "features", "label": "class"})
    assert data.state() == {
        "format": "npz",
        "arrays": {"x": "features", "label": "class", "y": "y"},
    }
    inputs, targets = data.batch("train", 0, 4, seed=0)
    rows = inputs["x"][:, 0, 0].long().numpy()
    assert torch.equal(targets["label"], torch.from_numpy(arrays["label"][rows]))


def test_a_next_token_target_from_examples_is_the_tokens_input_shifted(tmp_path):
    ids = np.arange(EXAMPLES * 9).reshape(EXAMPLES, 9)  # 9 ids: 8 read, 8 predicted
    ports = Ports((InputPort("tokens", "tokens", 16, vocab=EXAMPLES * 9),), LANGUAGE.targets)
    data = load(write_npz(tmp_path / "d.npz", {"tokens": ids}), ports)
    inputs, targets = data.batch("train", 0, 4, seed=0)
    assert inputs["tokens"].shape == targets["logits"].shape == (4, 8)
    assert torch.equal(targets["logits"][:, :-1], inputs["tokens"][:, 1:])
    rows = inputs["tokens"][:, 0].numpy() // 9
    assert torch.equal(targets["logits"], torch.from_numpy(ids[rows, 1:]))


def test_a_next_token_target_with_an_array_of_its_own_is_read_as_given(tmp_path):
    ids = np.arange(EXAMPLES * 8).reshape(EXAMPLES, 8) % 70
    path = write_npz(tmp_path / "d.npz", {"tokens": ids, "logits": (ids + 5) % 70})
    inputs, targets = load(path, LANGUAGE).batch("train", 0, 4, seed=0)
    assert inputs["tokens"].shape == (4, 8)
    assert torch.equal(targets["logits"], (inputs["tokens"] + 5) % 70)


def test_a_csv_per_token_array_is_flattened_into_indexed_columns(tmp_path):
    path = tmp_path / "d.csv"
    rows = [", ".join(f"{i + j}" for j in range(4)) + f", {i % 2}" for i in range(8)]
    header = "\ufeffids.0, ids.1, ids.2, ids.3, label\n"  # as a spreadsheet saves it
    path.write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    ports = Ports(
        (InputPort("ids", "tokens", 16, vocab=20),), (TargetPort("label", "classes", classes=2),)
    )
    inputs, targets = load(path, ports).batch("train", 0, 6, seed=0)
    first = inputs["ids"][:, 0]
    assert torch.equal(inputs["ids"], first[:, None] + torch.arange(4))
    assert torch.equal(targets["label"], first % 2)


# --------------------------------------------------------------------------- streams


def test_a_text_stream_draws_the_windows_batch_at_draws(text):
    data = load(text, LANGUAGE, val_fraction=0.1)
    corpus = load_corpus(text, val_fraction=0.1, context=16)
    inputs, targets = data.batch("train", 5, 4, seed=2)
    x, y = batch_at(corpus.train, 5, 4, 16, 2)
    assert torch.equal(inputs["tokens"], x) and torch.equal(targets["logits"], y)
    assert torch.equal(
        data.batch("val", -1, 4, seed=2)[0]["tokens"], batch_at(corpus.val, -1, 4, 16, 2)[0]
    )
    assert data.state() == {"format": "text", "vocabulary": corpus.vocabulary}
    assert data.sha256 == corpus.sha256


def test_the_vocabulary_in_the_state_keeps_a_resumed_run_s_ids(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc cab " * 20)
    state = {"format": "text", "vocabulary": "zcba "}  # a checkpoint's, not sorted the same
    data = load_training_data(DataSource(str(path)), LANGUAGE, val_fraction=0.1, state=state)
    ids = data.batch("train", 0, 2, seed=0)[0]["tokens"]
    assert set(ids.unique().tolist()) <= {1, 2, 3, 4} and data.state()["vocabulary"] == "zcba "


@pytest.mark.parametrize(
    ("suffix", "dtype"), [(".npy", "uint16"), (".bin", "uint16"), (".bin", "uint32")]
)
def test_a_token_array_is_memory_mapped_and_windowed(tmp_path, suffix, dtype):
    ids = (np.arange(3000) % 70).astype(dtype)
    path = tmp_path / f"ids{suffix}"
    np.save(path, ids) if suffix == ".npy" else ids.tofile(path)
    declared = {"dtype": dtype} if suffix == ".bin" else {}
    data = load(path, LANGUAGE, val_fraction=0.1, **declared)
    assert isinstance(data._ids, np.memmap)  # never read whole into an int64 tensor
    assert data.examples("train") == 2700 - 16
    inputs, targets = data.batch("train", 0, 4, seed=0)
    assert inputs["tokens"].dtype == torch.int64
    assert torch.equal(targets["logits"], (inputs["tokens"] + 1) % 70)
    starts = inputs["tokens"][:, 0]
    assert torch.equal(inputs["tokens"], (starts[:, None] + torch.arange(16)) % 70)


def test_stream_batches_are_a_function_of_seed_and_index_and_shards_tile_them(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, (np.arange(5000) % 70).astype(np.uint16))
    data = load(path, LANGUAGE, val_fraction=0.1)
    x = data.batch("train", 3, 6, seed=4)[0]["tokens"]
    assert torch.equal(x, data.batch("train", 3, 6, seed=4)[0]["tokens"])
    assert not torch.equal(x, data.batch("train", 4, 6, seed=4)[0]["tokens"])
    shards = [data.batch("train", 3, 6, seed=4, shard=(r, 3))[0]["tokens"] for r in range(3)]
    assert torch.equal(torch.cat(shards), x)
    held = data.batch("val", -1, 64, seed=4)[0]["tokens"]  # windows of the last 500 ids
    assert held.shape == (64, 16) and data.examples("val") == 500 - 16


def test_a_text_read_through_a_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = {"to": 0, "be": 1, "or": 2, "not": 3, "[UNK]": 4}
    tokenizer = tokenizers.Tokenizer(WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text("to be or not to be " * 30)
    data = load(tmp_path / "t.txt", LANGUAGE, 0.1, tokenizer=str(tmp_path / "tok.json"))
    assert data.state()["tokenizer"]["tokens"] == 5
    words = [0, 1, 2, 3, 0, 1] * 30  # the text's word ids
    windows = {tuple(words[s : s + 16]) for s in range(len(words) - 16)}
    inputs, _ = data.batch("train", 0, 3, seed=0)
    assert all(tuple(row) in windows for row in inputs["tokens"].tolist())


# --------------------------------------------------------------------------- the spec's `train.data`

LANGUAGE_SPEC = """
spec: 1
name: tiny
inputs: {tokens: {kind: tokens, vocab: 70, context: 16}}
nodes: {lm: {kind: transformer, width: 16, heads: 2, layers: 1}}
outputs: {logits: {from: lm, kind: lm_head}}
train:
"""


def test_the_spec_declares_its_data_relative_to_its_own_folder(write_spec, tmp_path):
    spec = write_spec(LANGUAGE_SPEC + "  data: {path: data/ids.bin, dtype: uint32, arrays: {}}\n")
    declared = compiler.analyze(spec).spec.train.data
    source = source_from_spec(declared, spec)
    assert source == DataSource(str(tmp_path / "data" / "ids.bin"), None, None, "uint32", {})


def test_a_declaration_that_cannot_be_honoured_is_refused_at_validation(spec_errors):
    errors = spec_errors(LANGUAGE_SPEC + "  data: {path: d.npz, tokenizer: tok.json}\n")
    assert (
        "spec.yaml:7:9: error: `data`: a `tokenizer` reads text, and this data is `npz`" in errors
    )


def test_checking_a_declaration_imports_neither_numpy_nor_torch():
    """Validation stays interactive: the rules of `train.data` live apart from the readers."""
    check = (
        "import sys; from compiler.language.spec import TrainData; "
        "TrainData(path='d.bin', dtype='uint32'); "
        "print([m for m in ('numpy', 'torch', 'pyarrow', 'tokenizers') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# --------------------------------------------------------------------------- bad input


def test_a_mapping_for_a_stream_is_refused_not_ignored(text):
    message = refused(text, LANGUAGE, 0.1, arrays={"tokens": "ids"})
    assert "`arrays` maps the arrays of example files, and this data is a `text` stream" in message


def test_a_missing_array_lists_what_the_file_has(tmp_path):
    arrays = tabular_arrays()
    del arrays["label"]
    message = refused(write_npz(tmp_path / "d.npz", arrays))
    assert "d.npz:1:1: error: the data file has no array `label` for output `label`" in message
    assert "it has `x` (40, 5, 3) float32, `y` (40, 5, 2) float32" in message
    assert "map it: `arrays: {label: NAME}`" in message


def test_a_missing_csv_column_lists_the_columns(tmp_path):
    arrays = tabular_arrays()
    path = write_csv(tmp_path / "d.csv", {"x": arrays["x"], "y": arrays["y"]})
    message = refused(path)
    assert "d.csv:1:1: error: the data file has no column `label` for output `label`" in message
    assert "it has `x` (15 columns), `y` (10 columns)" in message


def test_a_mapping_to_a_port_the_spec_lacks_is_refused(tmp_path):
    message = refused(write_npz(tmp_path / "d.npz", tabular_arrays()), arrays={"lable": "label"})
    assert "`arrays` maps `lable`, which the spec has no input or output of" in message


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"x": np.zeros((EXAMPLES, TOKENS, 4), np.float32)}, "`x` has 4 values per token; input `x` has `width: 3`"),
        ({"x": np.zeros((EXAMPLES, 3), np.float32)}, "`x` has shape (40, 3); it should be (examples, tokens, 3)"),
        ({"label": np.zeros(EXAMPLES, np.float32)}, "`label` holds float32; class ids are integers"),
        ({"label": np.full(EXAMPLES, 4)}, "array `label`[0] is 4, outside the classes of output `label`"),
        ({"label": np.zeros(EXAMPLES - 1, np.int64)}, "different numbers of examples: `x` 40, `label` 39"),
        ({"y": np.zeros((EXAMPLES, 4, 2), np.float32)}, "different numbers of tokens: `x` 5, `y` 4"),
        ({"x": np.zeros((EXAMPLES, 17, 3), np.float32)}, "`x` has 17 tokens per example; the model reads at most 16"),
    ],
)  # fmt: skip
def test_an_array_that_does_not_fit_its_port_is_refused(tmp_path, change, says):
    message = refused(write_npz(tmp_path / "d.npz", {**tabular_arrays(), **change}))
    assert "d.npz:1:1: error:" in message and says in message


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_value_that_is_not_finite_is_refused_with_its_place(tmp_path, value):
    arrays = tabular_arrays()
    arrays["y"][7, 2, 1] = value
    message = refused(write_npz(tmp_path / "d.npz", arrays))
    assert (
        f"d.npz:1:1: error: array `y`[7, 2, 1] is {value}: training needs finite values" in message
    )


def test_a_csv_error_names_the_line_and_column(tmp_path):
    arrays = tabular_arrays()
    arrays["y"][7, 2, 1] = np.nan
    message = refused(write_csv(tmp_path / "d.csv", arrays))
    column = list(flat_columns(arrays)).index("y.2.1") + 1
    assert f"d.csv:9:{column}: error: column `y.2.1` is nan" in message  # header + 8 rows
    path = tmp_path / "bad.csv"
    path.write_text(
        write_csv(tmp_path / "ok.csv", tabular_arrays())
        .read_text()
        .replace("\n3.0,", "\nthree,", 1)
    )
    assert "bad.csv:5:1: error: column `x.0.0` holds 'three', not a number" in refused(path)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    ids = np.arange(EXAMPLES * 9).reshape(EXAMPLES, 9) % 70
    ids[3, 5] = 70
    message = refused(write_npz(tmp_path / "d.npz", {"tokens": ids}), LANGUAGE)
    assert (
        "array `tokens`[3, 5] is 70, outside the vocabulary of input `tokens` (`vocab: 70`)"
        in message
    )
    stream = (np.arange(3000) % 70).astype(np.uint16)
    stream[1234] = 300
    stream.tofile(tmp_path / "ids.bin")
    message = refused(tmp_path / "ids.bin", LANGUAGE)
    assert (
        "ids.bin:1:1: error: token 1,234 is id 300, outside the vocabulary of input `tokens`"
        in message
    )


def test_too_few_examples_or_tokens_are_refused(tmp_path):
    data = tmp_path / "d.npz"
    write_npz(data, tabular_arrays())
    with pytest.raises(SpecError, match="the validation part has 10 example.s.; a batch takes 16"):
        load_training_data(DataSource(str(data)), TABULAR, val_fraction=0.25, batch=16)
    one = {k: v[:1] for k, v in tabular_arrays().items()}
    assert "has 1 example(s): too few" in refused(write_npz(tmp_path / "one.npz", one))
    np.save(tmp_path / "short.npy", np.arange(20, dtype=np.uint16))
    assert "the data file has 20 tokens: too few for training windows of 17" in refused(
        tmp_path / "short.npy", LANGUAGE
    )


def test_a_stream_for_a_spec_that_is_not_a_language_model_says_to_use_arrays(tmp_path, text):
    message = refused(text, TABULAR)
    assert "a text serves a spec with one tokens input and lm_head outputs" in message
    assert "in an .npz, .safetensors, .parquet or .csv file" in message


CORRUPT = {
    "d.npz": b"PK\x03\x04 this is no zip",
    "d.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
    "d.parquet": b"PAR1 nothing else",
    "d.csv": b'x.0.0,x.0.1\n"1,2\n',
    "d.npy": b"\x93NUMPY\x01\x00garbage",
    "d.bin": b"\x01\x02\x03",
}


@pytest.mark.parametrize("name", CORRUPT)
def test_a_corrupt_file_of_each_format_is_a_located_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(CORRUPT[name])
    ports = LANGUAGE if name.endswith((".npy", ".bin")) else TABULAR
    message = refused(path, ports)
    assert message.startswith(f"{path}:") and "error:" in message
    assert "Traceback" not in message


def test_a_resumed_run_reads_its_ports_from_the_checkpoint_s_arrays(tmp_path):
    path = write_npz(tmp_path / "d.npz", {**tabular_arrays(), "y2": tabular_arrays()["y"]})
    state = load(path).state()
    with pytest.raises(SpecError, match="the checkpoint being resumed read arrays for its ports"):
        load_training_data(
            DataSource(str(path), arrays={"y": "y2"}), TABULAR, val_fraction=0.25, state=state
        )


def test_a_tokenizer_file_that_is_not_one_is_refused(tmp_path, text):
    (tmp_path / "tok.json").write_text('{"model": "no"}')
    message = refused(text, LANGUAGE, 0.1, tokenizer=str(tmp_path / "tok.json"))
    assert f"{tmp_path / 'tok.json'}:1:1: error: not a `tokenizers` JSON file" in message


@pytest.mark.parametrize("name", ["fifo.npy", "fifo.npz", "fifo.txt", "dir.bin"])
def test_a_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, name):
    path = tmp_path / name
    path.mkdir() if name.startswith("dir") else os.mkfifo(path)
    ports = LANGUAGE if name.endswith((".npy", ".bin", ".txt")) else TABULAR
    message = refused(path, ports)
    assert "is a FIFO" in message or "is a directory" in message


def test_a_device_is_refused_before_it_is_read():
    assert "/dev/zero:1:1: error: the data file path is a character device" in refused(
        "/dev/zero", LANGUAGE, format="tokens"
    )


def test_a_flattened_array_with_a_missing_column_names_it(tmp_path):
    arrays = tabular_arrays()
    columns = flat_columns(arrays)
    del columns["x.3.1"]
    path = tmp_path / "d.csv"
    rows = [",".join(str(c[r]) for c in columns.values()) for r in range(EXAMPLES)]
    path.write_text(",".join(columns) + "\n" + "\n".join(rows) + "\n")
    assert "column `x.3.1` is missing: `x` has 14 columns of 15 for shape (5, 3)" in refused(path)


def test_parquet_lists_of_different_lengths_or_nulls_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ports = Ports(
        (InputPort("ids", "tokens", 16, vocab=20),), (TargetPort("label", "classes", classes=2),)
    )
    ragged = {"ids": [[1, 2, 3]] * 5 + [[1, 2]] + [[1, 2, 3]] * 4, "label": [0, 1] * 5}
    pq.write_table(pa.table(ragged), tmp_path / "ragged.parquet")
    assert "column `ids` holds lists of different lengths (row 0: 3, row 5: 2)" in refused(
        tmp_path / "ragged.parquet", ports
    )
    nulls = {"ids": [[1, 2, 3]] * 10, "label": [0, 1, None] + [0] * 7}
    pq.write_table(pa.table(nulls), tmp_path / "nulls.parquet")
    assert "column `label` is null at row 2" in refused(tmp_path / "nulls.parquet", ports)


def test_safetensors_in_bfloat16_are_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    arrays = tabular_arrays()
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tensors["x"] = tensors["x"].to(torch.bfloat16)  # small integers: exact in bfloat16
    save_file(tensors, str(tmp_path / "d.safetensors"))
    inputs, _ = load(tmp_path / "d.safetensors").batch("train", 0, 4, seed=0)
    assert inputs["x"].dtype == torch.float32
    assert torch.equal(inputs["x"], torch.from_numpy(arrays["x"][inputs["x"][:, 0, 0].long()]))
