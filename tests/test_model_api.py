"""How tools reach inside a compiled model: `model.node(name)` and `model.report()`.

    model = compiler.build_model("specs/federation.yaml")
    moon = model.node("moon")       # NodeHandle: name, kind, (group, member) address, module
    moon.states(states)             # its state out of the federation's per-group states
    model.node("lm").fractal        # a fractal's view: every level at once, any sub-model alone
    model(tokens); model.report()   # what the latest forward did, as plain JSON values

A name the spec does not declare is an error that lists the nodes and suggests the closest.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.cli import app
from compiler.tools.data import batch_at, load_corpus
from runtime.model import NodeHandle, UnknownNode
from tests.conftest import GALLERY

# --------------------------------------------------------------------------- node(name)


@pytest.mark.parametrize("path", GALLERY, ids=[p.stem for p in GALLERY])
def test_every_node_of_every_gallery_spec_has_a_handle(path):
    model = compiler.build_model(path, device="meta", budget=0)
    for name, spec in model.spec.nodes.items():
        node = model.node(name)
        assert isinstance(node, NodeHandle)
        assert (node.name, node.kind) == (name, spec.kind)
        if spec.kind == "companion":  # observes its host, sends nothing to the federation
            assert node.address is None and node.module is model.companions[name]
            assert model.node(node.observes).kind != "companion"
            continue
        g, m = node.address
        assert (node.group, node.member) == (g, m)
        assert node.module is model.federation.transformers[g]
        assert node.plan.nodes[m] == name
        if spec.kind == "fractal":
            assert node.fractal.levels == spec.levels
            assert node.fractal is model.fractal(name)  # one view per node
    assert [n.name for n in model.nodes()] == [
        n for n in model.spec.nodes if model.spec.nodes[n].kind != "companion"
    ] + list(model.companions)


def test_an_unknown_node_name_lists_the_nodes_and_suggests_the_closest():
    model = compiler.build_model(GALLERY[0].parent / "federation.yaml", device="meta", budget=0)
    with pytest.raises(KeyError) as info:
        model.node("mon")
    assert isinstance(info.value, UnknownNode)
    assert str(info.value) == (
        "no node `mon` (the nodes are sun, moon, mercury, venus, mars, dial); did you mean `moon`?"
    )
    with pytest.raises(KeyError, match=r"^no node `xyzzy` \(the nodes are sun, .*dial\)$"):
        model.node("xyzzy")


PAIR = """
spec: 1
name: pair
inputs:
  tokens: {kind: tokens, vocab: 20, context: 8}
nodes:
  left: {kind: transformer, width: 16, heads: 2, layers: 1}
  right: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  left_logits: {from: left, kind: lm_head}
  right_logits: {from: right, kind: lm_head}
  both: {from: [left, right], kind: lm_head}
"""


def test_the_state_a_handle_picks_is_the_one_its_outputs_read(write_spec):
    model = compiler.build_model(write_spec(PAIR)).eval()
    left, right = model.node("left"), model.node("right")
    assert (left.address, right.address) == ((0, 0), (0, 1))  # one batch group, two members
    assert (left.outputs, right.outputs) == (("left_logits",), ("right_logits",))
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        states = model.federation({"tokens": model.inputs["tokens"](tokens)})
        outputs = model(tokens)
        for node in (left, right):
            head = model.outputs[node.outputs[0]]
            assert torch.equal(head(node.states(states)), outputs[node.outputs[0]])


def test_a_companion_has_no_state_of_its_own_and_says_whose_to_read(write_spec):
    model = compiler.build_model(GALLERY[0].parent / "geolip_companion.yaml", budget=0)
    svae = model.node("svae")
    assert svae.observes == "host" and svae.outputs == ()
    with pytest.raises(ValueError, match=r"read its host's, `model.node\('host'\)`"):
        svae.states([])


# --------------------------------------------------------------------------- report()

LATTICE = """
spec: 1
name: lattice-pair
inputs:
  tokens: {kind: tokens, vocab: 20, context: 8}
defaults:
  transformer:
    width: 32
    heads: 4
    layers: 2
    attention: {kind: lattice, lattice: {shape: [2, 2]}}
nodes:
  a: {kind: transformer}
  b: {kind: transformer}
outputs:
  logits: {from: [a, b], kind: lm_head}
"""


def test_report_gives_each_lattice_layer_of_each_node_its_order_parameter(write_spec):
    model = compiler.build_model(write_spec(LATTICE))
    report = model.report()
    json.dumps(report)  # plain values only
    for name in ("a", "b"):
        node = model.node(name)
        layers = report["nodes"][name]["lattice"]
        assert list(layers) == ["blocks.0.attn.lattice", "blocks.1.attn.lattice"]
        for path, metrics in layers.items():
            layer = node.module.get_submodule(path)  # batched: one row per member
            r = float(layer.order_parameter()[node.member].detach())
            assert metrics["order_parameter"] == pytest.approx(r)
            assert {"coupling_force", "incoherence", "coupling", "range"} <= set(metrics)
    assert "feedback" not in report


EQUILIBRIUM = """
spec: 1
name: tiny-equilibrium
inputs:
  tokens: {kind: tokens, vocab: 20, context: 8}
nodes:
  reader: {kind: transformer, width: 16, heads: 2, layers: 1}
  refiner: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: reader, to: refiner}
  - {from: refiner, to: reader, kind: feedback, delay: 1}
feedback: {steps: 20, mode: equilibrium, lipschitz: 0.8}
outputs:
  logits: {from: refiner, kind: lm_head}
"""


def test_report_gives_the_equilibrium_solve_of_the_latest_forward(write_spec):
    model = compiler.build_model(write_spec(EQUILIBRIUM))
    assert "feedback" not in model.report()  # nothing solved yet
    model(torch.randint(0, 20, (2, 8)))["logits"].sum().backward()
    feedback = model.report()["feedback"]
    json.dumps(feedback)
    assert feedback["mode"] == "equilibrium"
    assert 1 <= feedback["iterations"] <= 20 and feedback["residual"] < 1e-4
    assert 1 <= feedback["backward_iterations"] <= 20 and feedback["lipschitz"] <= 0.8
    assert feedback == {"mode": "equilibrium", **model.federation.solve_report()}


def test_report_gives_a_companion_its_metrics_once_it_has_observed(write_spec):
    model = compiler.build_model(GALLERY[0].parent / "geolip_companion.yaml", budget=0)
    assert model.report()["nodes"]["svae"] == {"kind": "companion", "observes": "host"}
    model(torch.randint(0, 84, (1, 16)))
    entry = model.report()["nodes"]["svae"]
    json.dumps(entry)
    assert entry["companion"] == model.companion_metrics()["svae"]
    assert 0 <= entry["companion"]["in_envelope_fraction"] <= 1
    assert model.report()["nodes"]["host"] == {"kind": "transformer"}


def test_report_gives_a_fractal_its_levels_and_the_latest_level_losses(write_spec):
    model = compiler.build_model(write_spec(TWO_FRACTALS))
    assert model.report()["nodes"]["coarse"]["fractal"] == {
        "levels": 2,
        "level_weights": [1.0, 0.5],
    }
    tokens = torch.randint(0, 70, (2, 16))
    _, per_level = model.node("coarse").fractal.loss(tokens, tokens)
    entry = model.report()["nodes"]["coarse"]["fractal"]
    assert entry["level_loss"] == pytest.approx([float(v.detach()) for v in per_level])
    assert "level_loss" not in model.report()["nodes"]["fine"]["fractal"]


def test_any_part_with_a_report_method_contributes_to_its_node(write_spec):
    class Probe(torch.nn.Module):
        def report(self) -> dict:
            return {"seen": torch.tensor(3)}  # tensors come back as plain numbers

    model = compiler.build_model(write_spec(PAIR))
    model.node("left").module.add_module("probe", Probe())
    entries = model.report()["nodes"]
    assert entries["left"]["probe"] == {"seen": 3}
    assert entries["right"]["probe"] == {"seen": 3}  # a batch group's parts belong to all members


# --------------------------------------------------------------------------- fractals in training

TWO_FRACTALS = """
spec: 1
name: two-fractals
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  coarse:
    kind: fractal
    levels: 2
    level_weights: [1.0, 0.5]
    base: {width: 32, heads: 2, layers: 1}
  fine:
    kind: fractal
    levels: 3
    base: {width: 32, heads: 2, layers: 1}
outputs:
  coarse_logits: {from: coarse, kind: lm_head}
  fine_logits: {from: fine, kind: lm_head}
train: {steps: 2, batch: 2, eval_every: 2}
"""


def test_a_model_with_two_fractals_names_the_one_it_means(write_spec):
    model = compiler.build_model(write_spec(TWO_FRACTALS), device="meta", budget=0)
    with pytest.raises(ValueError, match=r"fractal nodes \['coarse', 'fine'\]; name one"):
        model.fractal()
    assert model.fractal("fine") is model.node("fine").fractal
    assert model.node("fine").fractal.outputs == ["fine_logits"]


def test_two_fractals_train_every_level_of_both(write_spec, text, tmp_path):
    spec = write_spec(TWO_FRACTALS)
    out = tmp_path / "run"
    args = ["train", str(spec), "--data", str(text), "--out", str(out), "--log-every", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    # several level-trained fractals: level_loss by node (with one, it is that node's list)
    assert {node: len(levels) for node, levels in lines[0]["level_loss"].items()} == {
        "coarse": 2,
        "fine": 3,
    }
    model = compiler.build_model(spec).train()  # the same initial weights and first batch
    corpus = load_corpus(text, val_fraction=0.1, context=16)
    x, y = batch_at(corpus.train, 0, 2, 16, seed=0)
    totals = []
    for node in ("coarse", "fine"):
        total, per_level = model.node(node).fractal.loss(y, x)
        totals.append(float(total.detach()))
        expected = [float(v.detach()) for v in per_level]
        assert lines[0]["level_loss"][node] == pytest.approx(expected, rel=1e-5)
    assert lines[0]["loss"] == pytest.approx(sum(totals), rel=1e-5)  # the task loss: weight 1 each


FED_FRACTAL = """
spec: 1
name: fed-fractal
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  feeder: {kind: transformer, width: 32, heads: 2, layers: 1}
  lm:
    kind: fractal
    levels: 2
    base: {width: 32, heads: 2, layers: 1}
edges:
  - {from: feeder, to: lm}
outputs:
  logits: {from: lm, kind: lm_head}
train: {steps: 1, batch: 2, eval_every: 1}
"""


def test_a_fractal_that_receives_messages_is_refused_before_it_could_train(spec_errors):
    # its levels run inside one module: messages would reach level 0 only (a silent downgrade
    # until the capability check refused it)
    errors = spec_errors(FED_FRACTAL)
    assert (
        "spec.yaml:12:24: error: `lm` is a `fractal` node, which cannot receive messages" in errors
    )


def test_a_fractal_no_output_reads_alone_trains_as_one_model_and_the_log_says_why(
    write_spec, text, tmp_path, caplog
):
    from compiler.tools.training import RunOptions, train

    spec = write_spec(
        FED_FRACTAL.replace("  - {from: feeder, to: lm}\n", "  []\n")
        .replace("edges:\n  []\n", "")
        .replace("logits: {from: lm,", "logits: {from: [feeder, lm],")
    )
    lm = compiler.build_model(spec, device="meta", budget=0).node("lm")
    assert "no output reads fractal `lm` alone" in lm.fractal_problem
    with pytest.raises(ValueError, match="no output reads fractal `lm` alone"):
        _ = lm.fractal
    with caplog.at_level("WARNING", logger="compiler.tools.training"):
        done = train(spec, RunOptions(data=str(text), out=str(tmp_path / "run")))
    assert "fractal `lm` trains without level losses" in caplog.text
    assert "level_loss" not in done[0] and done[0]["loss"] > 0


def test_lattice_records_name_their_node_and_layer(write_spec, text, tmp_path):
    from compiler.tools.training import RunOptions, train
    from compiler.tools.viz.lattice import layer_label

    spec = write_spec(
        LATTICE.replace("context: 8}", "context: 16}").replace("vocab: 20", "vocab: 70")
    )
    spec.write_text(spec.read_text() + "train: {steps: 1, batch: 2, eval_every: 1}\n")
    done = train(spec, RunOptions(data=str(text), out=str(tmp_path / "run")))
    layers = list(done[0]["lattice"])  # from model.report(): NODE.LAYER, one entry per node
    assert layers == [f"{n}.blocks.{i}.attn.lattice" for n in ("a", "b") for i in (0, 1)]
    assert [layer_label(name) for name in layers] == [
        "a layer 0",
        "a layer 1",
        "b layer 0",
        "b layer 1",
    ]
    model = compiler.build_model(spec, device="meta", budget=0)  # lattice_metrics' module names
    assert layer_label("federation.transformers.0.blocks.1.attn.lattice", model) == "a+b layer 1"
