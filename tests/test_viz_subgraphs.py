"""`epicycle viz` of sub-graphs (`kind: graph`): every sub-graph is a frame labelled by its path,
holding its nodes and its own sub-graphs to any depth, in the scene, in both layouts, in the SVG
and in Mermaid; drawn closed, a sub-graph is one box that the edges into its inside end at; the
HTML page holds one drawing per set of open sub-graphs, within a bound."""

from __future__ import annotations

import json
import re

import pytest

from compiler.tools.viz import render, scene_of
from compiler.tools.viz import views as views_module
from compiler.tools.viz.draw import bezier_point, node_size
from compiler.tools.viz.layout import Box, dot_layout, dot_program, python_layout
from compiler.tools.viz.mermaid import to_mermaid
from compiler.tools.viz.scene import collapsed
from compiler.tools.viz.views import plan_views, view_key
from tests.conftest import ROOT

FEDERATIONS = ROOT / "specs" / "federation_of_federations.yaml"
TRAIN = ["driver", "idler", "follower"]
ENGINES = [
    "python",
    pytest.param(
        "dot",
        marks=pytest.mark.skipif(dot_program() is None, reason="Graphviz `dot` is not installed"),
    ),
]

LOOP_THROUGH_A_GRAPH = """
spec: 1
name: loop-through-a-graph
seed: 0
defaults:
  transformer: {width: 32, heads: 2, layers: 1}
inputs:
  tokens: {kind: tokens, vocab: 17, context: 16}
nodes:
  head: {kind: transformer}
  block:
    kind: graph
    inputs:
      tokens: {kind: tokens, vocab: 17}
    nodes:
      a: {kind: transformer}
      b: {kind: transformer}
    edges:
      - {from: a, to: b}
  tail: {kind: transformer}
edges:
  - {from: head, to: block.a}
  - {from: block.b, to: tail}
  - {from: tail, to: block.a, kind: feedback, delay: 1}
feedback: {steps: 2}
outputs:
  logits: {from: tail, kind: lm_head}
"""


@pytest.fixture(scope="module")
def federations():
    return scene_of(FEDERATIONS)[0]


def train(path: str) -> list[str]:
    return [f"nodes.{path}.{gear}" for gear in TRAIN] + [f"outputs.{path}.phase"]


def inside(inner: Box, outer: Box) -> bool:
    return (
        outer.x <= inner.x
        and inner.right <= outer.right
        and outer.y <= inner.y
        and inner.bottom <= outer.bottom
    )


def apart(a: Box, b: Box) -> bool:
    return a.right <= b.x or b.right <= a.x or a.bottom <= b.y or b.bottom <= a.y


# --------------------------------------------------------------------------- the scene


def test_the_scene_nests_three_levels_of_frames_with_their_members(federations):
    frames = {f.path: f for f in federations.frames}
    assert list(frames) == [
        "inner",
        "inner.train_a",
        "inner.train_b",
        "outer",
        "outer.train_a",
        "outer.train_b",
    ]
    # level 1, the spec itself: what no frame holds
    framed = {m for f in federations.frames for m in f.members}
    assert [n.id for n in federations.nodes if n.id not in framed] == [
        "inputs.date",
        "nodes.sun",
        "outputs.longitude",
    ]
    # level 2: the planets hold their two trains and nothing of their own
    for planet in ("inner", "outer"):
        assert frames[planet].parent is None and frames[planet].members == []
        assert frames[planet].frames == [f"{planet}.train_a", f"{planet}.train_b"]
    # level 3: each train holds its three gears and its output
    for planet in ("inner", "outer"):
        for name in ("train_a", "train_b"):
            path = f"{planet}.{name}"
            assert frames[path].parent == planet and frames[path].frames == []
            assert frames[path].members == train(path)
    assert federations.frame_chain("nodes.outer.train_b.idler") == ["outer", "outer.train_b"]


def test_a_frame_counts_what_it_holds_at_every_depth(federations):
    planet, gears = federations.frame("inner"), federations.frame("inner.train_a")
    per_gear = federations.node("nodes.inner.train_a.driver").details["parameters"]
    head = federations.node("outputs.inner.train_a.phase").details["parameters"]
    assert gears.details["parameters"] == 3 * per_gear + head
    assert planet.details["parameters"] == 2 * gears.details["parameters"]
    assert planet.lines[0] == "graph · 6 nodes · 2 sub-graphs · 2 outputs"
    assert gears.lines[0] == "graph · 3 nodes · 1 output"


def test_a_batch_group_across_frames_is_named_in_its_members_not_framed(federations):
    # same-shaped gears of the two planets batch together, across the planets' frames
    assert federations.groups == []
    driver = federations.node("nodes.outer.train_a.driver")
    assert "batch group #1 ×2 (across sub-graphs)" in driver.lines


def test_the_reads_guard_applies_to_the_expanded_graph(federations):
    """The one input feeds all 13 nodes of every level: its reads are folded, as in a flat spec."""
    reads = [e for e in federations.edges if e.role == "read"]
    assert len(reads) == 13 and all(e.folded for e in reads)
    assert "read by 13 nodes (not drawn)" in federations.node("inputs.date").lines


def test_a_closed_frame_is_one_box_and_the_edges_into_it_end_there(federations):
    shut = collapsed(federations, ["inner"])
    box = shut.node("graphs.inner")
    assert box.role == "graph" and box.name == "inner"
    assert box.lines == federations.frame("inner").lines
    assert not any(n.id.startswith(("nodes.inner.", "outputs.inner.")) for n in shut.nodes)
    edges = {e.id: (e.source, e.target) for e in shut.edges}
    assert edges["edges.0"] == ("nodes.sun", "graphs.inner")  # sun -> inner.train_a.driver
    assert edges["outputs.1"] == ("graphs.inner", "outputs.longitude")
    assert "edges.2" not in edges  # train_a -> train_b: inside the closed frame
    assert [f.path for f in shut.frames] == ["outer", "outer.train_a", "outer.train_b"]
    # a closed frame inside an open one is a member of it
    partly = collapsed(federations, ["outer.train_a"])
    assert partly.frame("outer").members == ["graphs.outer.train_a"]
    assert partly.frame("outer").frames == ["outer.train_b"]


def test_a_spec_without_sub_graphs_has_no_frames():
    scene, _ = scene_of(ROOT / "specs" / "ring.yaml")
    assert scene.frames == [] and collapsed(scene, []) is scene


# --------------------------------------------------------------------------- the layouts


@pytest.mark.parametrize("engine", ENGINES)
def test_both_layouts_nest_the_frames_around_their_members_and_nothing_else(federations, engine):
    sizes = {n.id: node_size(n) for n in federations.nodes}
    placed = (python_layout if engine == "python" else dot_layout)(federations, sizes)
    assert set(placed.frames) == {f.path for f in federations.frames}
    for frame in federations.frames:
        box = placed.frames[frame.path]
        for member in frame.members:
            assert inside(placed.boxes[member], box), (frame.path, member)
        for inner in frame.frames:
            assert inside(placed.frames[inner], box), (frame.path, inner)
        held = {n.id for n in federations.nodes if frame.path in federations.frame_chain(n.id)}
        for node_id, node_box in placed.boxes.items():
            if node_id not in held:
                assert apart(node_box, box), (frame.path, node_id)
    for a, b in (("inner", "outer"), ("inner.train_a", "inner.train_b")):
        assert apart(placed.frames[a], placed.frames[b])


def test_the_python_layout_carries_an_edge_across_frames_to_its_own_nodes(write_spec):
    scene, _ = scene_of(write_spec(LOOP_THROUGH_A_GRAPH))
    placed = python_layout(scene, {n.id: node_size(n) for n in scene.nodes})
    edges = {e.id: e for e in scene.edges}
    for edge_id in ("edges.0", "edges.1", "edges.2", "reads.2"):  # into, out of, fed back in
        edge, route = edges[edge_id], placed.routes[edge_id]
        start, end = placed.boxes[edge.source], placed.boxes[edge.target]
        assert start.x <= route[0][0] <= start.right and route[0][1] in (start.y, start.bottom)
        assert end.x <= route[-1][0] <= end.right and route[-1][1] in (end.y, end.bottom)
    feedback = placed.routes["edges.2"]  # tail -> block.a, delayed: up out of tail, into a
    assert feedback[0][1] == placed.boxes["nodes.tail"].y
    assert feedback[-1][1] == placed.boxes["nodes.block.a"].bottom
    # into the frame through a port on its top: around block.a to block.b, not through it
    route = tuple(placed.routes["reads.2"])
    a = placed.boxes["nodes.block.a"]
    for t in range(1, 100):
        x, y = bezier_point(route, t / 100)
        assert not (a.x < x < a.right and a.y < y < a.bottom), (x, y)


# --------------------------------------------------------------------------- SVG and Mermaid


@pytest.mark.parametrize("engine", ENGINES)
def test_the_svg_draws_every_frame_labelled_by_its_path(federations, engine, tmp_path):
    out = render(federations, tmp_path / "sky.svg", engine=engine).path
    svg = out.read_text()
    frames = re.findall(r'<g class="frame" data-id="graphs\.([^"]+)">(.*?)</g>', svg)
    assert [path for path, _ in frames] == [  # outer frames first: drawn under the inner ones
        "inner",
        "outer",
        "inner.train_a",
        "inner.train_b",
        "outer.train_a",
        "outer.train_b",
    ]
    for path, body in frames:
        assert f">{path}</text>" in body
    assert "graph · 3 nodes · 1 output · 37.60K params" in dict(frames)["outer.train_b"]
    assert 'class="toggle"' not in svg  # nothing to click in a picture
    assert len(re.findall(r'<g class="node"', svg)) == 19  # every node, all frames open


def test_mermaid_nests_subgraphs_three_levels_deep(federations):
    text = to_mermaid(federations)
    where: dict[str, list[str]] = {}  # a node's name -> the subgraph titles around it
    stack: list[str] = []
    for line in text.splitlines():
        opened = re.match(r'\s*subgraph graph\d+\["<b>([^<]+)</b>', line)
        node = re.match(r'\s*n\d+\(?\["<b>([^<]+)</b>', line)
        if opened:
            stack.append(opened.group(1))
        elif line.strip() == "end" and stack:
            stack.pop()
        elif node:
            where[node.group(1)] = list(stack)
    assert where["sun"] == [] and where["longitude"] == [] and where["date"] == []
    assert where["inner.train_a.driver"] == ["inner", "inner.train_a"]
    assert where["outer.train_b.phase"] == ["outer", "outer.train_b"]
    assert 'subgraph graph0["<b>inner</b><br/>graph · 6 nodes · 2 sub-graphs' in text


# --------------------------------------------------------------------------- the page's views


def test_the_page_holds_a_view_per_reachable_set_of_open_frames(federations, tmp_path):
    plan = plan_views(federations)
    # each planet: closed, or open with each train open or closed: 1 + 2 * 2; two planets
    assert len(plan.states) == 5 * 5 and plan.fixed == ()
    assert plan.default == {f.path for f in federations.frames}  # 19 nodes: all open at load
    page = render(federations, tmp_path / "sky.html", engine="python").path.read_text()
    data = json.loads(re.search(r'id="scene-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["views"]) == 25 and sorted(data["opened"]) == sorted(plan.default)
    closed = data["views"][view_key(federations, plan.default - {"inner.train_a"})]["svg"]
    assert 'class="node" data-id="graphs.inner.train_a"' in closed
    assert "nodes.inner.train_a.driver" not in closed
    assert 'class="toggle" data-id="graphs.inner.train_a"' in closed


def test_past_the_bound_the_deeper_frames_stay_closed_and_the_page_says_so(
    federations, monkeypatch, tmp_path
):
    monkeypatch.setattr(views_module, "MAX_VIEWS", 3)
    plan = plan_views(federations)
    # `inner` alone makes 2 views, with `inner.train_a` openable too 3; anything more is over
    assert plan.openable == ("inner", "inner.train_a")
    assert len(plan.states) == 3 and len(plan.fixed) == 4
    page = render(federations, tmp_path / "sky.html", engine="python").path.read_text()
    assert "4 of them stay closed here" in page
    assert 'class="node" data-id="graphs.outer"' in page  # closed, and with no button to open
    assert 'class="toggle" data-id="graphs.outer"' not in page
    assert 'class="toggle" data-id="graphs.inner.train_a"' in page


def test_deeper_levels_open_at_load_only_while_the_drawing_stays_small(federations, monkeypatch):
    monkeypatch.setattr(views_module, "DEFAULT_OPEN_NODES", 12)
    assert plan_views(federations).default == {"inner", "outer"}  # the trains closed


# --------------------------------------------------------------------------- an invalid spec


@pytest.fixture
def broken_sky(tmp_path):
    """The federation of federations copied beside its part, for breaking one line of it."""
    (tmp_path / "parts").mkdir()
    part = ROOT / "specs" / "parts" / "gear_train.yaml"
    (tmp_path / "parts" / "gear_train.yaml").write_text(part.read_text())

    def broken(old: str, new: str):
        text = FEDERATIONS.read_text()
        assert old in text
        (tmp_path / "sky.yaml").write_text(text.replace(old, new, 1))
        return tmp_path / "sky.yaml"

    return broken


def test_an_invalid_spec_is_still_drawn_in_its_frames_with_the_error_at_its_node(broken_sky):
    spec = broken_sky("sun: {kind: transformer}", "sun: {kind: transformer, heads: 5}")
    scene, error = scene_of(spec, errors=True)
    assert error is not None and not scene.valid
    assert [f.path for f in scene.frames][:3] == ["inner", "inner.train_a", "inner.train_b"]
    assert scene.frame("outer.train_b").members == train("outer.train_b")
    assert scene.frame("inner").lines == ["graph · 6 nodes · 2 sub-graphs · 2 outputs"]
    assert "does not divide" in scene.node("nodes.sun").issues[0].message


def test_a_sub_graph_that_cannot_be_read_is_one_box_that_its_edges_reach(broken_sky):
    spec = broken_sky(
        "train_a: {kind: graph, spec: parts/gear_train.yaml}",
        "train_a: {kind: graph, spec: parts/none.yaml}",
    )
    scene, _ = scene_of(spec, errors=True)
    assert scene.frames == []  # nothing flattened: the spec's own graph nodes, as written
    assert "no such file" in scene.node("nodes.inner").issues[0].message
    edges = {e.id: (e.source, e.target) for e in scene.edges}
    assert edges["edges.0"] == ("nodes.sun", "nodes.inner")  # sun -> inner.train_a.driver
    assert not any(n.role == "unknown" for n in scene.nodes)
