"""Property-based fuzzing: whatever a spec file holds, the compiler ends in a model or a located error.

Mutations of every gallery spec (dropped keys, swapped types, huge/negative/non-finite numbers,
unicode, deep nesting, random bytes) go through the whole front and middle end; the only exception
allowed out is `SpecError`, and every diagnostic must carry a real `file:line:col`. The mutants
that validate then go through `epicycle compile` (in this process, a smoke forward of 4 tokens,
under a 64 MiB budget so a big mutant is refused by the resource guard rather than built): it
must end in exit 0 or 1, never an internal error (exit 3) or a traceback. This is the
bounded profile that runs in the suite (each case under 2 s and 200 MB of Python allocations); for a
long run: `EPICYCLE_FUZZ_EXAMPLES=5000 EPICYCLE_FUZZ_COMPILE_EXAMPLES=500 python -m pytest
tests/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import os
import time
import tracemalloc

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import compiler
from compiler.language.source import parse_spec_text
from compiler.tools.cli import app
from tests.conftest import GALLERY

# cheap shapes: 4 tokens, and at most 64 MiB of weights and activations (else a located refusal)
COMPILE = ["--tokens", "4", "--budget", "0.0625"]

EXAMPLES = int(os.environ.get("EPICYCLE_FUZZ_EXAMPLES", "60"))
# mutants sent on through `compile` (each builds and runs a model, so fewer than the front end's)
COMPILE_EXAMPLES = int(os.environ.get("EPICYCLE_FUZZ_COMPILE_EXAMPLES", "12"))


def plain(data):
    """The parsed spec as plain YAML data (the reader's floats keep their text, which
    `yaml.safe_dump` cannot write: mutants of seven gallery specs were skipped unseen)."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return float(data) if isinstance(data, float) else data


SEEDS = [plain(parse_spec_text(p.read_text(), p.name).data) for p in GALLERY]
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


def _at(data, path):
    for part in path:
        data = data[part]
    return data


def like(value) -> st.SearchStrategy:
    """A value of the same type as `value`, near it, so that many mutants still validate and
    reach `compile`."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(min_value=0, max_value=2 * value + 2)
    return st.floats(min_value=0, max_value=2 * value + 1)


ACTIONS = ("drop", "replace", "replace", "rename", "nest")


@st.composite
def mutated_specs(draw, values=weird_values, most=3, actions=ACTIONS, leaves=False):
    """Up to `most` mutations of a gallery spec, with `values` (None: values `like` the ones
    replaced); `leaves`: only of the numbers and switches inside a section."""
    data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(min_value=1, max_value=most))):
        all_paths = [
            p
            for p in paths(data)
            if not leaves or (len(p) > 2 and isinstance(_at(data, p), (int, float)))
        ]
        if not all_paths:
            continue
        path = draw(st.sampled_from(all_paths))
        action = draw(st.sampled_from(actions))
        if not path and action != "replace":
            continue
        value = draw(like(_at(data, path)) if values is None else values)
        data = mutate(data, path, action, value)
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


def check_compiles(path, text: str) -> None:
    """A spec that validates compiles and runs, or is refused with a located error (exit 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is fastest, and the machine is shared
    try:
        result = CliRunner().invoke(app, ["compile", str(path), *COMPILE])
    finally:
        torch.set_num_threads(threads)
    shown = f"exit {result.exit_code}:\n{result.output[-2000:]}\nfor:\n{text[:2000]!r}"
    assert result.exit_code in (0, 1), shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output and "internal error" not in result.output, shown


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_specs())
def test_mutated_gallery_specs_end_in_a_model_or_a_located_error(tmp_path_factory, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    check_outcome(text, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=COMPILE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_specs(None, most=2, actions=("drop", "replace", "replace"), leaves=True))
def test_mutants_that_validate_compile_and_run_or_are_refused_with_exit_1(tmp_path_factory, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        compiler.analyze(path)
    except compiler.SpecError:
        return  # the front end's answer, held to its standard by the test above
    check_compiles(path, text)


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
