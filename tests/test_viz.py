"""`epicycle viz`: a spec drawn as SVG, PNG, Mermaid or an offline HTML page, and a lattice model's
phases and order parameter. Every kind shows what makes it that kind: gears their teeth and exact
velocities, fractals their levels as nested boxes, lattice layouts their grid of heads, batch
groups a frame; feedback edges look different from forward ones."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import compiler
from compiler.tools.cli import app
from compiler.tools.viz import render, scene_of
from compiler.tools.viz.draw import node_size
from compiler.tools.viz.layout import dot_program, forward_and_side, layout, python_layout
from compiler.tools.viz.mermaid import to_mermaid
from tests.conftest import GALLERY, ROOT

runner = CliRunner()
SPECS = ROOT / "specs"
needs_dot = pytest.mark.skipif(dot_program() is None, reason="Graphviz `dot` is not installed")

BROKEN = """
spec: 1
name: broken
inputs:
  tokens: {kind: tokens, vocab: 84, context: 64}
nodes:
  a: {kind: transformer, width: 64, heads: 5}
  b: {kind: gear, teeth: 20, width: 64}
  c: {kind: transformer, width: 64}
edges:
  - {from: a, to: b}
  - {from: b, to: a}
  - {from: c, to: nowhere}
outputs:
  logits: {from: b, kind: lm_head}
"""

TINY_LATTICE = """
spec: 1
name: tiny-lattice
seed: 0
inputs:
  tokens: {kind: tokens, vocab: 16, context: 16}
nodes:
  body:
    kind: transformer
    width: 32
    heads: 4
    layers: 2
    attention: {kind: lattice, lattice: {shape: [2, 2]}}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
"""


def run(*args: str):
    return runner.invoke(app, list(args))


def svg_ids(text: str, cls: str) -> list[str]:
    return re.findall(rf'<g class="{cls}" data-id="([^"]+)"', text)


def element(text: str, element_id: str) -> str:
    """The SVG markup of one node or edge group."""
    match = re.search(rf'<g class="\w+" data-id="{re.escape(element_id)}">(.*?)</g>', text)
    assert match, f"{element_id} is not drawn"
    return match.group(1)


@pytest.fixture(scope="module")
def gear_svg(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "gear_train.svg"
    render(scene_of(SPECS / "gear_train.yaml")[0], path, engine="python")
    return path.read_text()


@pytest.mark.parametrize("spec", GALLERY, ids=lambda p: p.stem)
def test_every_gallery_spec_draws_every_node_and_edge(spec, tmp_path):
    scene, _ = scene_of(spec)
    result = render(scene, tmp_path / "graph.svg", engine="python")
    text = result.path.read_text()
    ir = compiler.analyze(spec)
    assert sorted(svg_ids(text, "node")) == sorted(ir.graph.nodes)
    drawn_edges = {e.id for e in scene.edges if not e.folded}
    assert set(svg_ids(text, "edge")) == drawn_edges
    assert "layout: pure-Python layered" in text


def test_gears_show_teeth_and_exact_velocity_and_edges_their_ratio(gear_svg):
    assert "223 teeth · ω 1" in element(gear_svg, "nodes.sun")
    assert "ω 254/19" in element(gear_svg, "nodes.moon")
    assert "51 teeth · ω 223/51" in element(gear_svg, "nodes.venus")
    assert "<polygon" in element(gear_svg, "nodes.sun")  # the cog
    mesh = element(gear_svg, "edges.1")  # sun -> venus, derived 223/51
    assert "×223/51" in mesh and 'stroke="#b7791f"' in mesh


def test_feedback_edges_are_dashed_red_and_labelled_with_their_delay(gear_svg):
    feedback = element(gear_svg, "edges.6")  # moon -> sun, delay 1
    forward = element(gear_svg, "edges.0")  # sun -> moon
    assert 'stroke="#c53030"' in feedback and "stroke-dasharray" in feedback
    assert "delay 1" in feedback and "×19/254" in feedback
    assert "stroke-dasharray" not in forward.split("<path")[1].split("/>")[0]


def test_batch_groups_are_framed_and_named(gear_svg):
    group = element(gear_svg, "groups.1")
    assert "batch group #1 ×3" in group and "stroke-dasharray" in group


def test_a_fractal_is_nested_boxes_labelled_with_each_levels_width(tmp_path):
    path = tmp_path / "fractal.svg"
    render(scene_of(SPECS / "fractalformer.yaml")[0], path, engine="python")
    lm = element(path.read_text(), "nodes.lm")
    # the node's own box, then 1 + 2 + 4 nested boxes for levels 0, 1, 2
    assert lm.count("<rect") == 1 + 7
    assert lm.count(">128<") == 1 and lm.count(">64<") == 2 and lm.count(">32<") == 4


def test_a_lattice_layout_is_a_grid_of_heads(tmp_path):
    path = tmp_path / "lattice.svg"
    render(scene_of(SPECS / "lattice_oscillator.yaml")[0], path, engine="python")
    body = element(path.read_text(), "nodes.body")
    assert body.count("<circle") == 16  # 4 x 4 heads
    assert "lattice 4×4 heads" in body


def test_an_input_read_by_every_gear_is_named_in_them_not_drawn_to_them():
    scene, _ = scene_of(SPECS / "antikythera.yaml")
    reads = [e for e in scene.edges if e.role == "read"]
    assert reads and all(e.folded for e in reads)
    assert "reads date" in scene.node("nodes.b1").lines
    assert "read by 39 nodes (not drawn)" in scene.node("inputs.date").lines


def test_the_python_layout_overlaps_nothing_and_runs_forward_edges_downwards():
    scene, _ = scene_of(SPECS / "antikythera.yaml")
    sizes = {n.id: node_size(n) for n in scene.nodes}
    placed = python_layout(scene, sizes)
    boxes = list(placed.boxes.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a.right <= b.x or b.right <= a.x or a.bottom <= b.y or b.bottom <= a.y
    forward, side = forward_and_side(scene)
    for edge in forward:
        assert placed.boxes[edge.source].bottom < placed.boxes[edge.target].y
    # the two feedback edges of the mechanism go around, not through, the train
    assert {e.id for e in side} == {e.id for e in scene.edges if e.feedback}
    assert placed.engine == "pure-Python layered"


def test_the_python_layout_is_forced_by_the_environment_even_where_dot_exists(monkeypatch):
    monkeypatch.setenv("EPICYCLE_VIZ_LAYOUT", "python")
    scene, _ = scene_of(SPECS / "federation.yaml")
    placed = layout(scene, {n.id: node_size(n) for n in scene.nodes})
    assert placed.engine == "pure-Python layered"


@needs_dot
def test_dot_lays_out_when_installed_and_the_output_says_so(tmp_path):
    result = run("viz", str(SPECS / "gear_train.yaml"), "-o", str(tmp_path / "g.svg"))
    assert result.exit_code == 0, result.output
    assert re.search(r"layout: graphviz dot \d", result.stdout)
    text = (tmp_path / "g.svg").read_text()
    assert re.search(r"layout: graphviz dot \d", text)
    assert "batch group #1 ×3" in element(text, "groups.1")


def test_mermaid_has_kinds_groups_thick_gear_trains_dotted_feedback_and_nested_fractals():
    gear = to_mermaid(scene_of(SPECS / "gear_train.yaml")[0])
    assert gear.startswith("%% gear-train-mini") and "\nflowchart TD\n" in gear
    assert 'subgraph group1["batch group #1 ×3: one batched call"]' in gear
    assert 'n1 ==>|"×223/51"| n3' in gear  # sun -> venus, a mesh
    assert 'n2 -.->|"×19/254 · delay 1"| n1' in gear  # moon -> sun, feedback
    assert "stroke:#c53030" in gear
    fractal = to_mermaid(scene_of(SPECS / "fractalformer.yaml")[0])
    assert fractal.count("subgraph n1_") == 2  # level 1 holds level 2's leaves
    assert fractal.count('["level 2 · width 32"]') == 4


def test_png_is_drawn_from_the_same_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="PNG output draws with matplotlib")
    from PIL import Image

    result = run("viz", str(SPECS / "fractalformer.yaml"), "-o", str(tmp_path / "f.png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "f.png") as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 500
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, boxes and edges, not a blank canvas


def test_the_html_page_is_one_file_that_needs_no_network(tmp_path):
    result = run("viz", str(SPECS / "gear_train.yaml"), "-o", str(tmp_path / "g.html"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "g.html").read_text()
    assert "<link" not in page and " src=" not in page and "@import" not in page
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'" in page  # the browser itself refuses any fetch
    data = json.loads(re.search(r'id="scene-data">(.*?)</script>', page, re.S).group(1))
    venus = next(n for n in data["nodes"] if n["id"] == "nodes.venus")
    assert venus["details"]["parameters"] == 99136 and venus["details"]["velocity"] == "223/51"
    assert venus["details"]["config"]["heads"] == 4


def test_spec_text_cannot_close_the_pages_script(write_spec, tmp_path):
    spec = write_spec(
        (SPECS / "transformer.yaml").read_text().replace("name: ", 'name: "</script><b>x" #', 1)
    )
    assert run("viz", str(spec), "-o", str(tmp_path / "t.html")).exit_code == 0
    page = (tmp_path / "t.html").read_text()
    assert "</script><b>" not in page


def test_an_invalid_spec_exits_1_with_its_errors_and_writes_nothing(write_spec, tmp_path):
    spec = write_spec(BROKEN)
    result = run("viz", str(spec), "-o", str(tmp_path / "b.html"))
    assert result.exit_code == 1
    assert f"{spec}:6:44: error: `heads: 5` does not divide node `a`'s width 64" in result.stderr
    assert not (tmp_path / "b.html").exists()


def test_with_errors_an_invalid_spec_is_drawn_with_each_error_at_its_node(write_spec, tmp_path):
    spec = write_spec(BROKEN)
    result = run("viz", str(spec), "-o", str(tmp_path / "b.svg"), "--errors", "--layout", "python")
    assert result.exit_code == 1  # drawn, but still invalid
    assert "3 issues shown" in result.stdout
    scene, error = scene_of(spec, errors=True)
    assert error is not None and not scene.valid
    assert [i.message for i in scene.node("nodes.a").issues] == [
        "`heads: 5` does not divide node `a`'s width 64"
    ]
    cycle = next(e for e in scene.edges if e.id == "edges.0")
    assert "loop with no delay" in cycle.issues[0].message
    dangling = next(e for e in scene.edges if e.id == "edges.2")
    assert dangling.issues[0].message == "no node named `nowhere`"
    assert scene.node("nodes.nowhere").role == "unknown"
    text = (tmp_path / "b.svg").read_text()
    assert 'stroke="#e53e3e" stroke-width="3"' in element(text, "nodes.a")
    assert "error: no node named `nowhere`" in text


def test_with_errors_a_file_that_is_not_yaml_still_gets_a_page_of_its_errors(tmp_path):
    spec = tmp_path / "tab.yaml"
    spec.write_text("spec: 1\nname: x\n\tnodes: {}\n")
    result = run("viz", str(spec), "-o", str(tmp_path / "t.svg"), "--errors", "--layout", "python")
    assert result.exit_code == 1
    text = (tmp_path / "t.svg").read_text()
    assert f"{spec}:3:1: error" in text and svg_ids(text, "node") == []


def test_an_unknown_extension_is_a_usage_error(tmp_path):
    result = run("viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path / "x.gif"))
    assert result.exit_code == 2
    assert "`.gif` is not a known format; name the output with one of .svg, .png, .mmd, .html" in (
        result.stderr
    )


def test_an_output_in_a_missing_directory_creates_it_and_an_unwritable_one_is_clear(tmp_path):
    target = tmp_path / "missing" / "x.svg"  # the output-path rule: parents are created
    assert run("viz", str(SPECS / "transformer.yaml"), "-o", str(target)).exit_code == 0
    assert target.is_file()
    (tmp_path / "plain").write_text("")
    result = run("viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path / "plain" / "x.svg"))
    assert result.exit_code == 2
    assert "is not a directory, so nothing can be written below it" in result.stderr
    result = run("viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path))  # a directory
    assert result.exit_code == 2  # no extension at all
    result = run("viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path / "d.svg"))
    (tmp_path / "dir.svg").mkdir()
    result = run("viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path / "dir.svg"))
    assert result.exit_code == 2 and "this is a directory" in result.stderr


def test_a_missing_output_or_an_unknown_layout_is_a_usage_error(tmp_path):
    assert run("viz", str(SPECS / "transformer.yaml")).exit_code == 2
    result = run(
        "viz", str(SPECS / "transformer.yaml"), "-o", str(tmp_path / "x.svg"), "--layout", "neato"
    )
    assert result.exit_code == 2 and "unknown layout `neato`" in result.stderr


# --------------------------------------------------------------------------- --lattice CHECKPOINT


@pytest.fixture
def lattice_checkpoint(tmp_path):
    from compiler.tools.checkpoint import save_checkpoint

    model = compiler.build_model(compiler.load_spec_text(TINY_LATTICE))
    directory = tmp_path / "run"
    save_checkpoint(model, directory)
    return directory, model


def write_metrics(directory, model, steps=(0, 10, 20, 30)):
    """metrics.jsonl as training writes it: `step` and `lattice_metrics(model)` per line."""
    from runtime.attention.lattice import lattice_metrics

    with open(directory / "metrics.jsonl", "w") as f:
        for step in steps:
            f.write(
                json.dumps({"step": step, "loss": 2.5, "lattice": lattice_metrics(model)}) + "\n"
            )


def test_lattice_writes_the_phase_field_and_the_order_parameter_over_steps(lattice_checkpoint):
    pytest.importorskip("matplotlib", reason="the lattice plots use matplotlib")
    from PIL import Image

    from compiler.tools.viz.lattice import order_parameter_series, phase_fields, read_metrics

    directory, model = lattice_checkpoint
    write_metrics(directory, model)
    result = run("viz", "--lattice", str(directory))
    assert result.exit_code == 0, result.output
    for name in ("lattice_phases.png", "lattice_order.png"):
        with Image.open(directory / name) as image:
            assert image.format == "PNG" and image.width > 300
    fields = phase_fields(compiler.tools.checkpoint.load_checkpoint(directory))
    assert [(f.node, f.block, f.shape, len(f.phases)) for f in fields] == [
        ("body", 0, (2, 2), 4),
        ("body", 1, (2, 2), 4),
    ]
    series = order_parameter_series(read_metrics(directory / "metrics.jsonl"))
    assert [steps for steps, _ in series.values()] == [[0, 10, 20, 30]] * 2
    assert all(0 <= r <= 1 for _, rs in series.values() for r in rs)


def test_lattice_without_metrics_says_so_and_still_draws_the_phases(lattice_checkpoint, tmp_path):
    pytest.importorskip("matplotlib", reason="the lattice plots use matplotlib")
    directory, _ = lattice_checkpoint
    out = tmp_path / "plots"
    out.mkdir()
    result = run("viz", "--lattice", str(directory), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "lattice_phases.png").exists() and not (out / "lattice_order.png").exists()
    assert f"no order-parameter plot: no {directory / 'metrics.jsonl'}" in result.stderr


def test_lattice_metrics_with_a_broken_line_is_a_located_error(lattice_checkpoint):
    pytest.importorskip("matplotlib", reason="the lattice plots use matplotlib")
    directory, model = lattice_checkpoint
    write_metrics(directory, model, steps=(0,))
    with open(directory / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "lattice": \n')
    result = run("viz", "--lattice", str(directory))
    assert result.exit_code == 1
    assert (
        f"{directory / 'metrics.jsonl'}:2:" in result.stderr
        and "not a JSON object" in result.stderr
    )


def test_lattice_of_a_model_without_lattice_layers_is_refused(tmp_path):
    from compiler.tools.checkpoint import save_checkpoint

    save_checkpoint(compiler.build_model(SPECS / "transformer.yaml"), tmp_path / "plain")
    result = run("viz", "--lattice", str(tmp_path / "plain"))
    assert result.exit_code == 1
    assert "no lattice attention layer to plot" in result.stderr
    assert run("viz", "--lattice", str(tmp_path / "nothing")).exit_code == 1


# --------------------------------------------------------------------------- what is drawn, in full


def test_the_command_counts_the_nodes_and_edges_it_draws(tmp_path):
    """antikythera's inputs fan out to many readers; those reads are folded into a line inside
    each reader, so the picture has fewer edges than the scene, and the count says the picture's."""
    result = run(
        "viz", str(SPECS / "antikythera.yaml"), "-o", str(tmp_path / "a.svg"), "--layout", "python"
    )
    assert result.exit_code == 0, result.output
    svg = (tmp_path / "a.svg").read_text(encoding="utf-8")
    drawn_nodes, drawn_edges = svg.count('<g class="node"'), svg.count('<g class="edge"')
    assert f"({drawn_nodes} nodes, {drawn_edges} edges;" in result.stdout
    scene, _ = scene_of(SPECS / "antikythera.yaml")
    assert drawn_edges < len(scene.edges)  # some reads are folded


SELF_LOOP = """
spec: 1
name: loop
inputs:
  tokens: {kind: tokens, vocab: 17, context: 16}
nodes:
  body: {kind: transformer, width: 32, heads: 2, layers: 1}
edges:
  - {from: body, to: body, kind: feedback, delay: 1, ratio: 355/113}
feedback: {steps: 2}
outputs:
  logits: {from: body, kind: lm_head}
"""


def test_a_self_loops_label_sits_beside_the_loop_not_under_its_node(write_spec):
    from compiler.tools.viz import figure_of
    from compiler.tools.viz.draw import Rect, Text, text_width

    figure = figure_of(scene_of(write_spec(SELF_LOOP))[0], "python")
    (loop,) = [e for e in figure.elements if e.cls == "edge" and "×355/113" in _texts(e)]
    (body,) = [e for e in figure.elements if e.id == "nodes.body"]
    box = next(s for s in body.shapes if isinstance(s, Rect))
    label = next(s for s in loop.shapes if isinstance(s, Text))
    left = label.x - text_width(label.text, label.size) / 2  # anchored in the middle
    assert left > box.x + box.w
    assert left + text_width(label.text, label.size) < figure.width  # and inside the picture


def test_everything_drawn_lies_inside_the_figure():
    from compiler.tools.viz import figure_of
    from compiler.tools.viz.draw import _extent

    for spec in GALLERY:
        figure = figure_of(scene_of(spec)[0], "python")
        left, top, right, bottom = _extent(figure.elements)
        assert left >= 0 and top >= 0, spec
        assert right <= figure.width and bottom <= figure.height, spec


def _texts(element) -> str:
    return " ".join(getattr(s, "text", "") for s in element.shapes)
