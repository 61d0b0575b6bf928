"""Property-based fuzzing: whatever a spec file holds, the compiler ends in a model or a located error.

Mutations of every gallery spec (dropped keys, swapped types, huge/negative/non-finite numbers,
unicode, deep nesting, random bytes) go through the whole front and middle end; the only exception
allowed out is `SpecError`, and every diagnostic must carry a real `file:line:col`. This is the
bounded profile that runs in the suite (each case under 2 s and 200 MB of Python allocations); for a
long run: `EPICYCLE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import os
import time
import tracemalloc

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compiler
from compiler.language.source import parse_spec_text
from tests.conftest import GALLERY

EXAMPLES = int(os.environ.get("EPICYCLE_FUZZ_EXAMPLES", "60"))
SEEDS = [parse_spec_text(p.read_text(), p.name).data for p in GALLERY]
for (
    _spec
) in GALLERY:  # pay the one-off torch / torch-geometric imports before the per-case time bound
    compiler.analyze(_spec)

weird_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["223/19", "1/0", "-3", "0", "ü∂", "1e400", "(((1", "sum", "rope", "gear", "tokens", ""]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.recursive(st.integers(), lambda inner: st.lists(inner, max_size=2), max_leaves=30),
)


def paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from paths(value, (*prefix, i))


def mutate(data, path, action, value):
    data = copy.deepcopy(data)
    if not path:
        return value if action == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "drop":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif action == "rename" and isinstance(parent, dict):
        parent[f"{last}x"] = parent.pop(last)
    elif action == "nest":
        parent[last] = [[parent[last]]]
    return data


@st.composite
def mutated_specs(draw):
    data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        all_paths = list(paths(data))
        path = draw(st.sampled_from(all_paths))
        action = draw(st.sampled_from(["drop", "replace", "replace", "rename", "nest"]))
        if not path and action != "replace":
            continue
        data = mutate(data, path, action, draw(weird_values))
    return data


def check_outcome(text: str | bytes, tmp_path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    start = time.perf_counter()
    tracemalloc.start()
    try:
        compiler.analyze(path)
    except compiler.SpecError as exc:
        assert exc.diagnostics, "a SpecError must say something"
        for d in exc.diagnostics:
            assert d.span.file == str(path) and d.span.line >= 1 and d.span.col >= 1
            assert d.message and "Traceback" not in d.message
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MB for:\n{text[:2000]!r}"
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed:.2f} s for:\n{text[:2000]!r}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_specs())
def test_mutated_gallery_specs_end_in_a_model_or_a_located_error(tmp_path_factory, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    check_outcome(text, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(GALLERY), st.binary(max_size=64), st.integers(min_value=0, max_value=2000))
def test_random_bytes_spliced_into_gallery_files(tmp_path_factory, path, junk, position):
    raw = path.read_bytes()
    position = min(position, len(raw))
    check_outcome(raw[:position] + junk + raw[position:], tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_arbitrary_text(tmp_path_factory, text):
    check_outcome(text, tmp_path_factory.mktemp("fuzz"))
