"""Sub-graphs as nodes, by example: `kind: graph` puts a whole graph where a node would be, inline
or from another spec file; it is flattened into one graph whose names are paths (`g.b1`)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import compiler
from compiler.language.frontend import load_spec, load_spec_text
from tests.conftest import ROOT

PART = """
spec: 1
name: part
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  date: {kind: features, width: 3}
nodes:
  driver: {kind: transformer}
  follower: {kind: transformer, layers: 2}
edges:
  - {from: driver, to: follower}
outputs:
  phase: {from: follower, kind: regression, width: 2}
"""

TOP = """
spec: 1
name: top
defaults:
  transformer: {width: 32, heads: 2, layers: 1}
inputs:
  when: {kind: features, width: 3, context: 8}
nodes:
  sun: {kind: transformer}
  g: {kind: graph, spec: parts/part.yaml, bind: {date: when}}
edges:
  - {from: sun, to: g.driver}
outputs:
  y: {from: [sun, g.follower], kind: regression, width: 2}
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return folder / next(iter(files))


def errors_of(path: Path) -> str:
    with pytest.raises(compiler.SpecError) as info:
        load_spec(path)
    return info.value.format().replace(str(path.parent) + os.sep, "")


def test_a_graph_node_is_its_nodes_named_by_path(tmp_path):
    spec = load_spec(write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART})).spec
    assert list(spec.nodes) == ["sun", "g.driver", "g.follower"]
    assert [(e.source, e.to) for e in spec.edges] == [
        ("sun", "g.driver"),
        ("g.driver", "g.follower"),
    ]
    assert list(spec.outputs) == ["y", "g.phase"]  # the sub-graph's outputs are the model's
    assert spec.outputs["g.phase"].source == ["g.follower"]


def test_its_inputs_are_ports_bound_to_the_including_graphs_inputs(tmp_path):
    spec = load_spec(write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART})).spec
    assert spec.nodes["g.driver"].input == ["when"]


def test_its_own_defaults_fill_its_nodes_before_the_including_specs(tmp_path):
    spec = load_spec(write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART})).spec
    assert (spec.nodes["g.driver"].width, spec.nodes["g.follower"].layers) == (16, 2)
    assert spec.nodes["sun"].width is None  # the including spec's defaults reach it later


def test_an_inline_body_is_the_same_as_the_file(tmp_path):
    inline = TOP.replace(
        "g: {kind: graph, spec: parts/part.yaml, bind: {date: when}}",
        "g:\n    kind: graph\n    bind: {date: when}\n"
        + textwrap.indent(
            "\n".join(
                line
                for line in textwrap.dedent(PART).splitlines()
                if line and not line.startswith(("spec:", "name:"))
            ),
            "    ",
        ),
    )
    from_file = load_spec(write(tmp_path / "a", {"top.yaml": TOP, "parts/part.yaml": PART})).spec
    written = load_spec(write(tmp_path / "b", {"top.yaml": inline})).spec
    assert written.model_dump() == from_file.model_dump()


def test_graphs_nest_and_repeat(tmp_path):
    middle = """
    spec: 1
    name: middle
    inputs:
      date: {kind: features, width: 3}
    nodes:
      t{i}: {repeat: 2, kind: graph, spec: part.yaml}
    edges:
      - {from: "t{i}.follower", to: "t{i+1}.driver"}
    """
    top = (
        TOP.replace("spec: parts/part.yaml", "spec: parts/middle.yaml")
        .replace("g.driver", "g.t0.driver")
        .replace("g.follower", "g.t1.follower")
    )
    path = write(tmp_path, {"top.yaml": top, "parts/middle.yaml": middle, "parts/part.yaml": PART})
    spec = load_spec(path).spec
    assert list(spec.nodes) == [
        "sun", "g.t0.driver", "g.t0.follower", "g.t1.driver", "g.t1.follower"
    ]  # fmt: skip
    assert ("g.t0.follower", "g.t1.driver") in [(e.source, e.to) for e in spec.edges]
    assert set(spec.outputs) == {"y", "g.t0.phase", "g.t1.phase"}


def test_a_mistake_inside_an_included_file_is_located_there_and_says_from_where(tmp_path):
    broken = PART.replace(
        "follower: {kind: transformer, layers: 2}", "follower: {kind: transformer, layers: -2}"
    )
    path = write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": broken})
    assert errors_of(path) == (
        "parts/part.yaml:9:41: error: `layers` is -2: it must be at least 1 "
        "(included from top.yaml:9:26)"
    )


INCLUDES = {
    "a cycle": (
        {
            "parts/part.yaml": PART.replace(
                "  driver: {kind: transformer}", "  driver: {kind: graph, spec: ../top.yaml}"
            )
        },
        "the graphs include each other: top.yaml -> part.yaml -> top.yaml",
    ),
    "out of the tree": (
        {"top.yaml": TOP.replace("parts/part.yaml", "../elsewhere/part.yaml")},
        "top.yaml:9:26: error: `spec: ../elsewhere/part.yaml` is a path out of the including spec's folder tree",
    ),
    "an absolute path": (
        {"top.yaml": TOP.replace("parts/part.yaml", "/etc/passwd")},
        "top.yaml:9:26: error: `spec: /etc/passwd` is an absolute path",
    ),
    "a url": (
        {"top.yaml": TOP.replace("parts/part.yaml", "https://example.com/part.yaml")},
        "is a URL; only local files are included",
    ),
    "a missing file": (
        {"top.yaml": TOP.replace("parts/part.yaml", "parts/nothing.yaml")},
        "top.yaml:9:26: error: `spec: parts/nothing.yaml`: no such file",
    ),
    "a whole-model section": (
        {"parts/part.yaml": PART + "feedback: {steps: 2}\n"},
        "error: a sub-graph cannot set `feedback:`",
    ),
    "a typo in a section": (
        {"parts/part.yaml": PART.replace("edges:", "edgse:")},
        "parts/part.yaml:10:1: error: a sub-graph's file has no section `edgse`",
    ),
    "an unbound port": (
        {"top.yaml": TOP.replace(", bind: {date: when}", "")},
        "input `date` of graph `g` is bound to `date`, which is not an input here",
    ),
    "a port of another width": (
        {"parts/part.yaml": PART.replace("width: 3}", "width: 5}")},
        "parts/part.yaml:6:33: error: input `date` of graph `g` has `width: 5`, and the input "
        "`when` it is bound to has `width: 3` (included from top.yaml:9:26)",
    ),
    "a dot written by hand": (
        {"top.yaml": TOP.replace("  sun: {kind: transformer}", "  s.un: {kind: transformer}")},
        "top.yaml:8:3: error: `s.un`: a dot separates a sub-graph's name from the names inside it",
    ),
}


@pytest.mark.parametrize("case", list(INCLUDES), ids=list(INCLUDES))
def test_includes_that_cannot_be_honoured_are_refused_where_written(tmp_path, case):
    files, expected = INCLUDES[case]
    path = write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART, **files})
    assert expected in errors_of(path)


def test_a_symlink_out_of_the_tree_is_refused(tmp_path):
    outside = tmp_path / "outside"
    write(outside, {"part.yaml": PART})
    path = write(tmp_path / "tree", {"top.yaml": TOP.replace("parts/part.yaml", "link.yaml")})
    (path.parent / "link.yaml").symlink_to(outside / "part.yaml")
    assert "is a symlink that leads out of the including spec's folder tree" in errors_of(path)


def test_the_shipped_federation_of_federations_flattens_to_three_levels():
    spec = load_spec(ROOT / "specs" / "federation_of_federations.yaml").spec
    assert "inner.train_b.follower" in spec.nodes and "outer.train_a.phase" in spec.outputs
    assert len(spec.nodes) == 13


def test_the_recorded_text_holds_the_included_files_so_an_edited_part_changes_the_digest(tmp_path):
    top = write(tmp_path, {"top.yaml": TOP, "parts/part.yaml": PART})
    before = load_spec(top)
    assert (
        "# ---- parts/part.yaml" in before.text and "#   driver: {kind: transformer}" in before.text
    )
    (tmp_path / "parts" / "part.yaml").write_text(
        textwrap.dedent(PART).replace("layers: 2", "layers: 3")
    )
    after = load_spec(top)
    assert after.digest != before.digest
    reread = load_spec_text(after.text, str(top))  # a checkpoint's text, read back beside its parts
    assert reread.text == after.text
