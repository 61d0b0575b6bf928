"""`epicycle compile SPEC --node PATH`, by example: a sub-graph is compiled alone, as a model of
its own whose inputs and outputs are the sub-graph's, with the settings it had where it was
included; a node shows its row in the whole model's table."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import compiler
from compiler.language.standalone import Surroundings, load_sub_graph
from compiler.tools.checkpoint import load_checkpoint
from compiler.tools.cli import app
from tests.conftest import ROOT
from tests.test_subgraphs import PART, write  # width 16, heads 2 and layers 1 by its defaults

FEDERATIONS = str(ROOT / "specs" / "federation_of_federations.yaml")

# three levels: the part inside `mid` sets `width`, `heads` and `layers`, `mid` `mlp_ratio`, the
# spec the rest; `mid`'s input `date` reads the spec's `when`, and the part's `date` reads `mid`'s
TOP = """
spec: 1
name: top
seed: 3
defaults:
  transformer: {width: 32, heads: 4, layers: 3, mlp_ratio: 4.0, norm: rmsnorm}
inputs:
  when: {kind: features, width: 3, context: 8}
nodes:
  sun: {kind: transformer}
  mid:
    kind: graph
    bind: {date: when}
    defaults:
      transformer: {mlp_ratio: 2.0}
    inputs:
      date: {kind: features, width: 3}
    nodes:
      own: {kind: transformer, width: 24}
      g{i}: {kind: graph, repeat: 2, spec: parts/part.yaml}
    edges:
      - {from: own, to: g0.driver}
    outputs:
      level: {from: own, kind: regression, width: 1}
edges:
  - {from: sun, to: mid.own}
outputs:
  y: {from: [sun, mid.g1.follower], kind: regression, width: 2}
"""


@pytest.fixture
def top(tmp_path) -> str:
    return str(write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART}))


def compile_(*args: str):
    return CliRunner().invoke(app, ["compile", *args])


def test_a_sub_graph_alone_takes_its_ports_as_inputs_and_gives_its_outputs(top):
    alone = compiler.analyze(load_sub_graph(top, "mid")).spec
    assert list(alone.inputs) == ["date"]  # declared as the input it was bound to: `when`
    assert alone.inputs["date"].width == 3 and alone.inputs["date"].context == 8
    assert list(alone.nodes) == ["own", "g0.driver", "g0.follower", "g1.driver", "g1.follower"]
    assert list(alone.outputs) == ["level", "g0.phase", "g1.phase"]  # its sub-graphs' too
    assert alone.seed == 3 and alone.name == "top.mid"


def test_its_nodes_keep_the_settings_they_had_where_it_was_included(top):
    """The part's own defaults first, then `mid`'s, then the spec's: the flattening's order."""
    whole, alone = compiler.analyze(top), compiler.analyze(load_sub_graph(top, "mid"))
    for name in alone.spec.nodes:
        assert (
            alone.graph.nodes[f"nodes.{name}"]["settings"]
            == whole.graph.nodes[f"nodes.mid.{name}"]["settings"]
        )
    driver = alone.graph.nodes["nodes.g0.driver"]["settings"]
    assert (driver["width"], driver["heads"], driver["layers"]) == (16, 2, 1)
    assert (driver["mlp_ratio"], driver["norm"]) == (2.0, "rmsnorm")


NULLED = """
spec: 1
name: nulled
defaults:
  transformer: {width: 16, heads: 2, layers: 1, mlp_ratio: 4.0}
inputs:
  x: {kind: features, width: 3}
nodes:
  o:
    kind: graph
    defaults:
      transformer: {mlp_ratio: 2.0, layers: 2}
    inputs:
      x: {kind: features, width: 3}
    nodes:
      i:
        kind: graph
        defaults:
          transformer: {mlp_ratio: null}
        inputs:
          x: {kind: features, width: 3}
        nodes:
          n: {kind: transformer}
        outputs:
          z: {from: n, kind: regression, width: 2}
outputs:
  y: {from: o.i.n, kind: regression, width: 2}
"""


@pytest.mark.parametrize("path", ["o", "o.i"])
def test_a_null_default_in_a_graph_leaves_the_setting_to_the_spec_not_to_the_graphs_around(
    tmp_path, path
):
    """`i` writes `mlp_ratio: null`, so `o`'s 2.0 never fills it and the spec's 4.0 does."""
    spec = str(write(tmp_path, {"nulled.yaml": NULLED}))
    whole, alone = compiler.analyze(spec), compiler.analyze(load_sub_graph(spec, path))
    inner = "n" if path == "o.i" else "i.n"
    settings = alone.graph.nodes[f"nodes.{inner}"]["settings"]
    assert settings == whole.graph.nodes["nodes.o.i.n"]["settings"]
    assert (settings["mlp_ratio"], settings["layers"]) == (4.0, 2)


def alone_and_whole(spec: str, path: str):
    """The sub-graph compiled alone, on the whole model's bus (as `compile --node` compiles it),
    and the whole model."""
    whole = compiler.analyze(spec)
    around = Surroundings(bus_width=whole.facts.bus_width, context=whole.facts.context)
    alone = load_sub_graph(spec, path, around=around)
    return compiler.analyze(alone), whole


def rows_of(ir, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The node rows (parameters, FLOPs/token) and output heads (parameters) under `prefix`, by
    their path below it."""
    facts, n = ir.facts, len(prefix)
    rows = {
        name[n:]: (row["parameters"], row["flops_per_token"])
        for name, row in facts.estimates.items()
        if name.startswith(prefix)
    }
    heads = {
        "outputs." + part[8 + n :]: (count,)
        for part, count in facts.parameters_outside_nodes.items()
        if part.startswith("outputs." + prefix)
    }
    return rows | heads


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (FEDERATIONS, "inner"),
        (FEDERATIONS, "inner.train_a"),
        (FEDERATIONS, "outer.train_b"),
        ("top", "mid.g1"),
    ],
)
def test_its_parameters_are_the_sum_of_its_rows_in_the_whole_table(spec, path, top):
    """Row for row, its nodes and output heads alone are those of the whole model's table under
    its path, parameters and FLOPs alike, on the whole model's bus (`mid.g1`'s nodes of width 16
    project onto the 32 wide bus of `top`); alone it adds only an input embedding and a message
    layer of its own (the whole model has one of each for all its nodes)."""
    alone, whole = alone_and_whole(top if spec == "top" else spec, path)
    mine, theirs = rows_of(alone), rows_of(whole, path + ".")
    assert mine == theirs
    own = {
        part: n
        for part, n in alone.facts.parameters_outside_nodes.items()
        if not part.startswith("outputs.")
    }
    assert set(own) == {"inputs.date", "messages"}
    assert alone.facts.parameters == sum(v[0] for v in theirs.values()) + sum(own.values())
    with torch.device("meta"):
        built = compiler.build_model(alone, budget=0)
    assert sum(p.numel() for p in built.parameters()) == alone.facts.parameters


def test_an_edge_into_it_that_was_a_node_s_only_way_off_the_bus_is_all_that_differs(top):
    """`mid.own` receives only from `sun`, outside `mid`: alone it has no projection off the
    32 wide bus to its width 24, and every other row is the whole model's."""
    alone, whole = alone_and_whole(top, "mid")
    mine, theirs = rows_of(alone), rows_of(whole, "mid.")
    assert theirs["own"][0] - mine["own"][0] == 32 * 24
    assert {k: v for k, v in mine.items() if k != "own"} == {
        k: v for k, v in theirs.items() if k != "own"
    }
    shown = " ".join(compile_(top, "--node", "mid", "--no-smoke").output.split())
    assert "against 30.99K in the rows of `mid` in top (alone, a node that only the edges" in shown


def test_compile_node_on_a_sub_graph_prints_its_table_runs_it_and_compares_it_with_the_whole():
    shown = compile_(FEDERATIONS, "--node", "inner", "--tokens", "4")
    assert shown.exit_code == 0, shown.output
    assert "federation-of-federations.inner  (spec sha256" in shown.output
    assert "│ train_a.driver " in shown.output and "outer." not in shown.output
    assert (
        "`inner` alone: 76.54K parameters; its nodes and output heads 75.20K, as in the rows"
        in (" ".join(shown.output.split()))
    )
    assert "smoke forward: train_a.phase (2, 4, 2), train_b.phase (2, 4, 2)" in shown.output


def test_compile_node_out_writes_the_sub_graph_alone_as_a_self_contained_checkpoint(tmp_path, top):
    """Its spec files are written inline, so the checkpoint loads with no part file beside it."""
    out = tmp_path / "alone"
    written = compile_(
        top, "--node", "mid.g1", "--out", str(out), "--tokens", "4", "--set", "seed=5"
    )
    assert written.exit_code == 0, written.output
    text = (out / "spec.yaml").read_text()
    assert text.startswith("# sub-graph `mid.g1` of ") and "spec: parts/" not in text
    assert "--set 'seed=5'" in text.splitlines()[0]  # set on the whole spec, before extraction
    model = load_checkpoint(out)
    assert model.spec.seed == 5
    assert list(model.spec.outputs) == ["phase"] and list(model.spec.nodes) == [
        "driver",
        "follower",
    ]
    x = torch.randn(2, 4, 3)
    assert model(date=x)["phase"].shape == (2, 4, 2)


def test_compile_node_on_a_node_prints_its_row_and_refuses_to_write_it_alone(tmp_path):
    shown = compile_(FEDERATIONS, "--no-smoke", "--node", "inner.train_a.driver")
    assert shown.exit_code == 0, shown.output
    assert "total of inner.train_a.driver" in shown.output and "12.51K" in shown.output
    refused = compile_(FEDERATIONS, "--node", "sun", "--out", str(tmp_path / "w"))
    assert refused.exit_code == 2
    assert "epicycle: --out with --node sun: `sun` is a node, and a node alone is no model" in (
        refused.output
    )
    assert not (tmp_path / "w").exists()


def test_an_unknown_path_is_located_on_the_command_line_with_the_nearest_one():
    wrong = compile_(FEDERATIONS, "--no-smoke", "--node", "iner.train_a")
    assert wrong.exit_code == 1
    assert "command line: --node:1:1: error: no node or sub-graph `iner.train_a`" in wrong.output
    assert "did you mean `inner.train_a`?" in wrong.output


@pytest.mark.parametrize("option", [["--level", "1"], ["--index", "0"], ["--fractal", "lm"]])
def test_the_options_of_a_fractal_s_sub_model_are_refused_with_node(option):
    both = compile_(FEDERATIONS, "--node", "inner", *option)
    assert both.exit_code == 2, both.output
    assert both.output.startswith(f"epicycle: {'--node and ' if option[0] == '--level' else ''}")
    assert option[0] in both.output


SHAPES = """
spec: 1
name: shapes
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  x: {kind: features, width: 3}
nodes:
  sun: {kind: transformer}
  driven:
    kind: graph
    nodes:
      a: {kind: transformer, input: []}
    edges:
      - {from: sun, to: a}
  reaching:
    kind: graph
    inputs:
      x: {kind: features, width: 3}
    nodes:
      b: {kind: transformer}
    edges:
      - {from: sun, to: b}
    outputs:
      z: {from: b, kind: regression, width: 2}
outputs:
  y: {from: [sun, driven.a], kind: regression, width: 2}
"""


def test_a_sub_graph_that_is_nothing_alone_is_refused_where_it_is_written(tmp_path):
    spec = str(write(tmp_path, {"shapes.yaml": SHAPES}))
    driven = compile_(spec, "--node", "driven")
    assert driven.exit_code == 1
    assert "shapes.yaml:9:3: error: sub-graph `driven` has no inputs of its own" in driven.output
    assert "shapes.yaml:9:3: error: sub-graph `driven` has no outputs of its own" in driven.output
    # an edge from outside the sub-graph names a node it does not have alone
    reaching = compile_(spec, "--node", "reaching")
    assert reaching.exit_code == 1
    assert "shapes.yaml:22:16: error: no node named `sun`" in reaching.output


SHARED = """
spec: 1
name: shared
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  x: {kind: features, width: 4}
perspectives:
  center: {kind: projection}
nodes:
  sun: {kind: gear, perspective: center}
  g:
    kind: graph
    inputs:
      x: {kind: features, width: 4}
    nodes:
      moon: {kind: gear, perspective: center}
    outputs:
      z: {from: moon, kind: regression, width: 2}
edges:
  - {from: sun, to: g.moon, kind: mesh, ratio: 2}
outputs:
  y: {from: sun, kind: regression, width: 2}
"""


def test_a_perspective_shared_with_nodes_outside_is_copied_into_it(tmp_path):
    """`g.moon` sees the input through the spec's `center`, as `sun` does: alone it has a copy."""
    spec = str(write(tmp_path, {"shared.yaml": SHARED}))
    alone = load_sub_graph(spec, "g")
    assert alone.spec.perspectives["center"].kind == "projection"
    assert alone.source.span(("perspectives", "center")).line == 8  # where the spec declares it
    assert compiler.analyze(alone).facts.parameters_outside_nodes["perspectives"] == 4 * 4


SHORTER = """
spec: 1
name: shorter
defaults:
  transformer: {width: 16, heads: 2, layers: 1, position: learned}
inputs:
  long: {kind: features, width: 3, context: 16}
  short: {kind: features, width: 3, context: 8}
nodes:
  sun: {kind: transformer, input: long}
  g:
    kind: graph
    bind: {x: short}
    inputs:
      x: {kind: features, width: 3}
    nodes:
      n: {kind: transformer}
    outputs:
      z: {from: n, kind: regression, width: 2}
outputs:
  y: {from: sun, kind: regression, width: 2}
"""


def test_it_keeps_the_whole_model_s_context_so_learned_positions_keep_their_shape(tmp_path):
    """The context is the longest input's, 16; alone `g` reads only `short` (8), so left to
    itself it would learn half the positions."""
    spec = str(write(tmp_path, {"shorter.yaml": SHORTER}))
    alone, whole = alone_and_whole(spec, "g")
    assert alone.spec.inputs["x"].context == 16 and rows_of(alone) == rows_of(whole, "g.")
    itself = compiler.analyze(load_sub_graph(spec, "g"))
    assert rows_of(whole, "g.")["n"][0] - rows_of(itself)["n"][0] == (16 - 8) * 16
