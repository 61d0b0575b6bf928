"""Any legal name works: a spec's names never collide with Python or with torch.

Names are `[A-Za-z_][A-Za-z0-9_-]*`, so `to`, `forward`, `training`, `state_dict`, `type`, `cuda`,
`class` and `__init__` are all legal, and `to` and `To` are two names. The runtime keeps inputs,
outputs, companions and perspectives in `runtime.names.NamedModules`, keyed by the name as
written; an entry whose name a torch module already uses is stored as `@name` (a character no spec
name holds), every other entry under its own name, so the state-dict keys of names that always
worked are unchanged. One name is refused, by a located rule: an input called `self`, which
`model(self=...)` cannot pass (golden: tests/bad_specs/input_named_self).
"""

from __future__ import annotations

import keyword

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compiler.language.diagnostics import SpecError
from compiler.language.frontend import load_spec_text
from compiler.pipeline import analyze, build_model
from compiler.tools.checkpoint import load_checkpoint, save_checkpoint
from compiler.tools.cli import app
from compiler.tools.training import RunOptions, train
from runtime.names import MARK, NamedModules, stored_name
from tests.conftest import CORPUS

HOSTILE = [
    "to",
    "To",
    "TO",
    "forward",
    "training",
    "modules",
    "type",
    "state_dict",
    "load_state_dict",
    "cuda",
    "keys",
    "items",
    "update",
    "parameters",
    "_modules",
    "_parameters",
    "__init__",
    "__class__",
    "__dict__",
    "T_destination",
    "dump_patches",
    "class",
    "lambda",
    "None",
    "args",
    "kwargs",
    "iterations",
    "a-b",
    "_",
]
ROLES = ("input", "perspective", "node", "companion", "output")
NAME = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_\-]{0,12}\Z").filter(lambda n: n != "self")


def _spec(input: str, perspective: str, node: str, companion: str, output: str) -> str:
    """A tokens model with a gear seen through a perspective, a companion and an lm_head: every
    place a spec name becomes part of the module tree."""
    return f"""
spec: 1
name: hostile-names
seed: 0
inputs:
  {input}: {{kind: tokens, vocab: 70, context: 16}}
perspectives:
  {perspective}: {{kind: rotation}}
nodes:
  {node}: {{kind: gear, teeth: 10, perspective: {perspective}, width: 16, heads: 2, layers: 1}}
  {companion}:
    {{kind: companion, rows: 4, sphere_dim: 4, lens_dim: 8, heads: 2, layers: 1, hidden: 16}}
edges:
  - {{from: {node}, to: {companion}, kind: companion}}
outputs:
  {output}: {{from: {node}, kind: lm_head}}
train:
  steps: 2
  batch: 2
  eval_every: 2
"""


def _one_training_step(model, input: str, output: str) -> None:
    tokens = torch.randint(0, 70, (2, 16))
    logits = model(**{input: tokens})[output]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss = loss + model.auxiliary_loss()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def _cast(start: int) -> list[dict[str, str]]:
    """HOSTILE in fives, one name per role, the roles turning from one five to the next so that
    each name is tried in more than one role."""
    fives = [HOSTILE[i : i + len(ROLES)] for i in range(0, len(HOSTILE), len(ROLES))]
    fives[-1] = [*fives[-1], *HOSTILE[: len(ROLES) - len(fives[-1])]]
    return [
        dict(
            zip(
                ROLES,
                five[(i + start) % len(five) :] + five[: (i + start) % len(five)],
                strict=True,
            )
        )
        for i, five in enumerate(fives)
    ]


@pytest.mark.parametrize("names", _cast(0), ids=lambda names: ",".join(names.values()))
def test_names_torch_or_python_use_work_in_every_role(names, tmp_path):
    model = build_model(load_spec_text(_spec(**names), "hostile.yaml"))
    assert list(model.inputs) == [names["input"]] and list(model.outputs) == [names["output"]]
    _one_training_step(model, names["input"], names["output"])
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_names_that_differ_only_in_case_are_different_entries():
    model = build_model(load_spec_text(_spec("to", "TO", "To", "tO", "to"), "case.yaml"))
    assert model.node("To").kind == "gear" and model.node("tO").kind == "companion"
    assert list(model.inputs) == ["to"] and model.inputs["to"] is not model.outputs["to"]


def test_ordinary_names_keep_their_state_dict_keys():
    """Checkpoints written before names were guarded, and GPT-2 imports, name these keys."""
    model = build_model(
        load_spec_text(_spec("tokens", "lunar", "body", "svae", "logits"), "a.yaml")
    )
    keys = model.state_dict().keys()
    assert "inputs.tokens.table.weight" in keys
    assert any(k.startswith("outputs.logits.") for k in keys)
    assert not any(MARK in k for k in keys)


def test_a_name_torch_uses_is_stored_under_a_mark_no_spec_name_can_hold():
    assert stored_name("to") == "@to" and stored_name("tokens") == "tokens"
    container = NamedModules({"to": torch.nn.Identity(), "x": torch.nn.Identity()})
    assert container.to.__func__ is torch.nn.Module.to  # the method is still the method
    assert list(container) == ["to", "x"] and "to" in container
    assert container.get_submodule("@to") is container["to"]  # what torch.export walks
    container.train(False)  # `training` is set on the container, not on an entry
    assert not container.training


@pytest.mark.filterwarnings("ignore:The tensor attributes self.companion_outputs")
def test_a_model_with_hostile_names_exports_and_compiles_whole():
    model = build_model(load_spec_text(_spec("to", "forward", "state_dict", "training", "cuda")))
    tokens = torch.randint(0, 70, (2, 16))
    expected = model.eval()(tokens)["cuda"]
    program = torch.export.export(model, (tokens,))
    assert torch.allclose(program.module()(tokens)["cuda"], expected)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(tokens)["cuda"], expected)


def test_validate_and_compile_accept_hostile_names(tmp_path):
    spec = tmp_path / "hostile.yaml"
    spec.write_text(_spec("to", "class", "forward", "type", "state_dict"), encoding="utf-8")
    runner = CliRunner()
    for command in ("validate", "compile"):
        result = runner.invoke(app, [command, str(spec)])
        assert result.exit_code == 0, result.output
        assert "internal error" not in result.output


def test_a_model_with_hostile_names_trains_and_resumes(tmp_path):
    """Optimizer state is saved by parameter name: `@` names survive the round trip."""
    spec = tmp_path / "hostile.yaml"
    spec.write_text(_spec("to", "modules", "forward", "items", "state_dict"), encoding="utf-8")
    out = str(tmp_path / "run")
    first = train(spec, RunOptions(data=str(CORPUS), out=out, log_every=1, stop_at=1))
    second = train(spec, RunOptions(data=str(CORPUS), out=out, log_every=1, resume=out))
    assert [r["step"] for r in first + second] == [1, 2]


def test_a_python_keyword_is_just_a_name():
    assert keyword.iskeyword("class") and keyword.iskeyword("lambda")
    analyze(load_spec_text(_spec("class", "lambda", "def", "import", "return"), "kw.yaml"))


def test_a_confusable_unicode_name_is_refused_with_its_location():
    """Names are ASCII: a Cyrillic `о` in `tо` cannot pass for `to`."""
    with pytest.raises(SpecError) as info:
        load_spec_text(_spec("t\u043e", "p", "n", "c", "o"), "cyrillic.yaml")
    (error,) = info.value.errors
    assert (error.span.file, error.span.line) == ("cyrillic.yaml", 6)
    assert "is not a valid name" in error.message


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.sampled_from(HOSTILE), NAME), min_size=len(ROLES), max_size=len(ROLES))
)
def test_any_legal_names_compile_and_train_a_step_or_are_refused_at_a_location(names):
    roles = dict(zip(ROLES, names, strict=True))
    text = _spec(**roles)
    try:
        model = build_model(load_spec_text(text, "fuzzed.yaml"))
    except SpecError as exc:  # the node and the companion share one namespace, say
        for error in exc.errors:
            assert error.span.file == "fuzzed.yaml" and error.span.line >= 1
        return
    _one_training_step(model, roles["input"], roles["output"])
