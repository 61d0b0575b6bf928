"""A checkpoint is read only if it is what was written.

`model.safetensors` records its spec's text and SHA-256 in its header; the digest is compared on
every read (`load_checkpoint`, `load_weights`, `--resume`, `export`, `from_pretrained`), so a
header whose spec was edited is refused, saying both digests, instead of compiling the edited spec
around the old weights. `training.safetensors` holds JSON (vocabulary, data position, settings,
optimizer and schedule state) and tensors; the JSON is read through pydantic models
(`StoredTrainingState`) and every `$tensor` reference is checked against the tensors present, so a
damaged state is a clear exit-1 refusal naming the field, never a crash in the resumed run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compiler.language.diagnostics import SpecError
from compiler.tools.checkpoint import (
    load_checkpoint,
    load_weights,
    read_checkpoint_spec,
    read_training_state,
    training_state_problems,
)
from compiler.tools.cli import app
from compiler.tools.training import RunOptions, train
from tests.conftest import CORPUS

SPEC = """spec: 1
name: integrity
seed: 1
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
train:
  optimizer: {kind: adamw, lr: 0.01}
  steps: 4
  batch: 2
  eval_every: 2
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One run of 2 steps (of 4): weights, training state and spec; copied by each test."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "spec.yaml").write_text(SPEC, encoding="utf-8")
    train(root / "spec.yaml", RunOptions(data=str(CORPUS), out=str(root / "run"), stop_at=2))
    return root


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copy(trained / "spec.yaml", tmp_path / "spec.yaml")
    return tmp_path / "run"


def _rewrite(path: Path, edit) -> None:
    """Write the safetensors file again with `edit(header, tensors)` applied."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    edit(header, tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def _edit_embedded_spec(checkpoint: Path) -> None:
    def edit(header, _):
        header["spec"] = header["spec"].replace("seed: 1", "seed: 2")

    _rewrite(checkpoint / "model.safetensors", edit)


def _edit_state(checkpoint: Path, change) -> None:
    def edit(header, tensors):
        state = json.loads(header["state"])
        result = change(state, tensors)
        header["state"] = json.dumps(state if result is None else result)

    _rewrite(checkpoint / "training.safetensors", edit)


# --------------------------------------------------------------------------- the spec's digest


def test_an_edited_embedded_spec_is_refused_with_both_digests(checkpoint):
    _edit_embedded_spec(checkpoint)
    with pytest.raises(SpecError) as info:
        load_checkpoint(checkpoint)
    (error,) = info.value.errors
    assert error.span.file == str(checkpoint / "model.safetensors")
    assert "the spec in the header was edited after the weights were saved" in error.message
    assert "records spec sha256" in error.message and "hashes to" in error.message
    assert error.hint and "unedited copy" in error.hint


def test_load_weights_checks_the_digest_too(checkpoint):
    model = load_checkpoint(checkpoint)
    _edit_embedded_spec(checkpoint)
    with pytest.raises(SpecError, match="was edited after the weights were saved"):
        load_weights(model, checkpoint)


def test_a_checkpoint_without_a_digest_is_refused(checkpoint):
    _rewrite(checkpoint / "model.safetensors", lambda header, _: header.pop("spec_sha256"))
    with pytest.raises(SpecError, match="records no spec sha256"):
        read_checkpoint_spec(checkpoint)


def test_export_of_an_edited_checkpoint_exits_1(checkpoint, tmp_path):
    _edit_embedded_spec(checkpoint)
    out = tmp_path / "model.pt2"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "was edited after the weights were saved" in result.stderr
    assert "internal error" not in result.output and not out.exists()


def test_resuming_an_edited_checkpoint_exits_1(checkpoint, tmp_path):
    _edit_embedded_spec(checkpoint)
    spec = tmp_path / "spec.yaml"
    args = ["train", str(spec), "--data", str(CORPUS), "--out", str(checkpoint)]
    result = CliRunner().invoke(app, [*args, "--resume", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "was edited after the weights were saved" in result.stderr


# --------------------------------------------------------------------------- the training state


def _drop_a_moment(state, tensors):
    tensors.pop(next(k for k in tensors if k.endswith("/exp_avg")))


def _drop_the_rng(state, tensors):
    tensors.pop("rng/0/cpu")


def _break_a_reference(state, tensors):
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = {"$tensor": 5}


def _set(path: tuple, value):
    def change(state, _):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


DAMAGE = {
    "a missing optimizer moment": (_drop_a_moment, "is missing"),
    "a missing random state": (_drop_the_rng, "the random state of process 0"),
    "world as text": (_set(("rng", "world"), "1"), "`state.rng.world` has the wrong type"),
    "position as text": (_set(("data", "position"), "2"), "`state.data.position` has the wrong"),
    "vocabulary as a number": (_set(("vocabulary",), 5), "`state.vocabulary` has the wrong type"),
    "groups as a mapping": (_set(("optimizer", "param_groups"), {}), "param_groups` has the"),
    "lr as text": (
        _set(("optimizer", "param_groups", 0, "lr"), "fast"),
        "`state.optimizer.param_groups.0.lr` has the wrong type (a string)",
    ),
    "schedule counter as text": (_set(("schedule", "last_epoch"), "2"), "schedule.last_epoch"),
    "a reference to nothing": (_break_a_reference, "is not a tensor reference"),
    "no rng section": (lambda state, _: state.pop("rng") and None, "`state.rng` is missing"),
    "a list for the state": (lambda s, _: [], "`state` has the wrong type (a list)"),
    "an unknown field": (_set(("extra",), 1), "`state.extra` is not a field"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=str)
def test_a_damaged_training_state_names_what_is_wrong(checkpoint, damage):
    change, expected = DAMAGE[damage]
    _edit_state(checkpoint, change)
    with pytest.raises(SpecError) as info:
        read_training_state(checkpoint)
    (error,) = info.value.errors
    assert error.span.file == str(checkpoint / "training.safetensors")
    assert "the training state is damaged" in error.message and expected in error.message
    assert "resume from an earlier checkpoint" in error.hint


def test_resuming_a_damaged_training_state_exits_1(checkpoint):
    _edit_state(checkpoint, _set(("rng", "world"), "one"))
    spec = checkpoint.parent / "spec.yaml"
    args = ["train", str(spec), "--data", str(CORPUS), "--out", str(checkpoint)]
    result = CliRunner().invoke(app, [*args, "--resume", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "the training state is damaged: `state.rng.world` has the wrong type" in result.stderr
    assert "internal error" not in result.output


def test_a_sound_training_state_reads_back(checkpoint):
    state = read_training_state(checkpoint)
    assert state.step == 2 and state.unpack("optimizer")["param_groups"]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False)
    | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_anywhere_in_the_state_is_accepted_or_refused_in_words(trained, data):
    """Replace one value of a real state's JSON with any JSON: `training_state_problems` either
    finds nothing (the value fits) or says what is wrong; it never raises."""
    tensors = {}
    with safetensors.safe_open(str(trained / "run" / "training.safetensors"), "pt") as handle:
        state = json.loads(handle.metadata()["state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    path = data.draw(st.sampled_from(list(_paths(state))))
    value = data.draw(JSON)
    if path:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        state = value
    problems = training_state_problems(2, state, tensors)
    assert all(isinstance(p, str) and p for p in problems)
