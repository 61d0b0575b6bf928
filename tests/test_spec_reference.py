"""The spec reference, `docs/spec.md`: generated from the JSON Schema, so it can never fall behind.

Every field of every model in the schema is listed with its description, every registered
component has its own subsection (a component registered from Python included), every link lands
on a section, and the shipped file is exactly what `epicycle schema --markdown` writes today.
"""

from __future__ import annotations

import re
from typing import Literal

import pytest
from pydantic import Field
from typer.testing import CliRunner

import compiler
from compiler.language.reference import spec_reference
from compiler.language.registry import REGISTRY, ComponentConfig
from compiler.tools.cli import app
from tests.conftest import ROOT

SHIPPED = ROOT / "docs" / "spec.md"


@pytest.fixture(scope="module")
def reference() -> str:
    return spec_reference()


def rows(text: str) -> dict[str, list[str]]:
    """Table rows of the reference by field name: `| \\`width\\` | ... |` -> the row's cells."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\| \[?`([^`]+)`", line)
        if match:
            found.setdefault(match.group(1), []).append(line)
    return found


def one_line(description: str) -> str:
    """A description as a table cell holds it: on one line, pipes escaped."""
    return " ".join(description.split()).replace("|", "\\|")


def test_the_shipped_reference_is_current(reference):
    assert SHIPPED.read_text(encoding="utf-8") == reference, (
        "docs/spec.md is out of date; regenerate it with: epicycle schema --markdown -o docs/spec.md"
    )


def test_every_field_of_every_model_is_listed_with_its_description(reference):
    schema = compiler.json_schema()
    listed = rows(reference)
    models = {"(the spec)": schema, **schema["$defs"]}
    for model, definition in models.items():
        for name, prop in definition.get("properties", {}).items():
            assert name in listed, f"{model}.{name} is missing from the reference"
            if prop.get("description"):
                text = one_line(prop["description"])
                assert any(text in row for row in listed[name]), (
                    f"{model}.{name}: its description is missing from the reference"
                )


def test_the_top_level_fields_have_sections_in_declaration_order(reference):
    fields = list(compiler.json_schema()["properties"])
    assert fields[:3] == ["spec", "name", "seed"]
    headings = re.findall(r"^## `([a-z_]+)`$", reference, flags=re.M)
    assert headings == fields


def test_every_registered_component_has_a_subsection_with_its_summary(reference):
    components = list(REGISTRY)
    assert {"attention", "rotary", "optimizer", "schedule"} <= {c.family for c in components}
    for component in components:
        assert f"\n### `kind: {component.name}`\n" in reference, component.name
        assert component.summary.split(". ")[0] in " ".join(reference.split()), component.name


def test_a_node_kind_reads_as_its_kind_then_its_fields(reference):
    gear = reference.split("### `kind: gear`\n", 1)[1].split("\n### ", 1)[0]
    assert "whose attention heads rotate at the gear's angular velocity" in gear
    assert "| `kind` | `gear` | **required** |" in gear
    assert "| `ratio` | rational (e.g. `254/19`) | `null` |" in gear
    assert "| `perspective` | name | `null` |" in gear
    assert "| `attention` | [AttentionComponent](#attentioncomponent) | `null` |" in gear


def test_types_are_written_for_people(reference):
    assert "| `vocab` | integer 1..16777216 | **required** | Vocabulary size. |" in reference
    assert "| `norm` | one of: `layernorm`, `rmsnorm` | `null` |" in reference
    assert "| `grad_clip` | number > 0, <= 1000000 or null | `1.0` |" in reference
    # node kinds come from the registry, like components: the field links to their section
    assert "mapping of name -> [Node](#nodes)" in reference
    assert "| `shape` | list of integer 1..4096 (1..8 items) | **required** |" in reference


def test_every_link_lands_on_a_section(reference):
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", reference, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    links = set(re.findall(r"\]\(#([^)]+)\)", reference))
    assert links and links <= anchors, sorted(links - anchors)


def test_the_reference_is_deterministic(reference):
    assert spec_reference() == reference
    assert str(ROOT) not in reference


def test_epicycle_schema_markdown_writes_the_same_text(tmp_path, reference):
    runner = CliRunner()
    out = tmp_path / "spec.md"
    result = runner.invoke(app, ["schema", "--markdown", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == reference
    printed = runner.invoke(app, ["schema", "--markdown"])
    assert printed.exit_code == 0 and printed.stdout == reference


class Stepwise(ComponentConfig):
    """Learning rate multiplied by `gamma` every `every` steps (a test component)."""

    kind: Literal["stepwise"] = "stepwise"
    every: int = Field(100, ge=1, description="Steps between drops.")
    gamma: float = Field(0.5, gt=0, le=1, description="Factor of each drop.")


@pytest.fixture
def stepwise():
    compiler.register("schedule", config=Stepwise)(lambda optimizer, steps, **options: None)
    yield
    del REGISTRY.families["schedule"]["stepwise"]


def test_a_component_registered_from_python_appears_in_a_fresh_reference(reference, stepwise):
    fresh = spec_reference()
    assert "### `kind: stepwise`" not in reference
    section = fresh.split("### `kind: stepwise`\n", 1)[1].split("\n## ", 1)[0]
    assert "Learning rate multiplied by `gamma` every `every` steps" in section
    assert "| `every` | integer >= 1 | `100` | Steps between drops. |" in section
    assert "| `gamma` | number > 0, <= 1 | `0.5` | Factor of each drop. |" in section
