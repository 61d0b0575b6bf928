from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import compiler

ROOT = Path(__file__).resolve().parent.parent
GALLERY = sorted((ROOT / "specs").glob("*.yaml"))
# the first 20,000 characters of the corpus `epicycle data shakespeare` writes, shipped here
CORPUS = ROOT / "tests" / "fixtures" / "shakespeare_20k.txt"
# `epicycle train --device auto` takes a GPU where there is one; the suite's training tests compare
# against CPU computations, so they train on the CPU everywhere unless a test asks for CUDA (the
# variable is `--device`'s default; subprocesses inherit it)
os.environ.setdefault("EPICYCLE_DEVICE", "cpu")


def python_path() -> str:
    """PYTHONPATH for a subprocess that must import this checkout, keeping what the environment
    already puts there (a machine whose pydantic lives on PYTHONPATH keeps it)."""
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(ROOT), inherited) if p)


@pytest.fixture
def text() -> Path:
    """A small character-level corpus for training tests (read only)."""
    return CORPUS


@pytest.fixture
def write_spec(tmp_path):
    """Write a YAML snippet (dedented) to `spec.yaml` and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def spec_errors(write_spec):
    """The formatted diagnostics a snippet produces, with the temporary path shortened to `spec.yaml`."""

    def errors(text: str) -> str:
        path = write_spec(text)
        with pytest.raises(compiler.SpecError) as info:
            compiler.analyze(path)
        return info.value.format().replace(str(path), "spec.yaml")

    return errors


TINY = """
spec: 1
name: tiny
inputs:
  tokens: {kind: tokens, vocab: 17, context: 16}
nodes:
  body: {kind: transformer, width: 32, heads: 2, layers: 1}
outputs:
  logits: {from: body, kind: lm_head}
"""
