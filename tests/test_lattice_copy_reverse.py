"""The copy-reverse comparison (`examples/lattice_copy_reverse.py`; the `lot` project's benchmark):
its plain baseline is matched to the lattice model parameter for parameter, its lattice-off
ablation switches the phase term off and back, and its quick mode runs end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

import compiler
from runtime.attention.lattice import lattice_layers, phase_term_off
from tests.conftest import ROOT
from tests.test_examples import run_example


def example():
    path = ROOT / "examples" / "lattice_copy_reverse.py"
    spec = importlib.util.spec_from_file_location("lattice_copy_reverse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SIZES = argparse.Namespace(vocab=16, half=8, width=64, layers=2, substeps=4)


def test_the_plain_baseline_differs_by_exactly_the_lattices_parameters():
    """Per layer, the lattice adds its oscillators' parameters (a phase, a frequency and a gain
    per head; one coupling and one range) and gives the two phase dimensions of each query and
    key head the projection rows the plain model spends on content (4 rows of `width` a head)."""
    cr = example()
    lattice = compiler.build_model(compiler.load_spec_text(cr.spec_text(SIZES, 0, True)))
    plain = compiler.build_model(compiler.load_spec_text(cr.spec_text(SIZES, 0, False)))
    heads, width, layers = 4, SIZES.width, SIZES.layers
    own = layers * (3 * heads + 2)
    phase_rows = layers * 4 * heads * width
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(lattice) - count(plain) == own - phase_rows
    assert cr.parameter_difference(lattice, plain) == {
        "lattice": count(lattice),
        "plain": count(plain),
        "lattice_own": own,
        "phase_rows": phase_rows,
    }


def test_the_lattice_off_ablation_zeroes_the_phase_term_and_restores_it():
    cr = example()
    model = compiler.build_model(compiler.load_spec_text(cr.spec_text(SIZES, 0, True))).eval()
    sequences = cr.copy_reverse(4, SIZES.half, SIZES.vocab, torch.Generator().manual_seed(0))
    before = model(sequences)["logits"]
    with phase_term_off(model):
        assert all(not layer.strength.detach().any() for _, layer in lattice_layers(model))
        off = model(sequences)["logits"]
    assert not torch.allclose(before, off)
    torch.testing.assert_close(model(sequences)["logits"], before, rtol=0, atol=0)


def test_copy_reverse_quick(tmp_path):
    pytest.importorskip("matplotlib", reason="the example draws with matplotlib")
    run_example("lattice_copy_reverse.py", "--out", str(tmp_path))
    result = json.loads((tmp_path / "copy_reverse.json").read_text())
    arms = {"lattice", "plain", "lattice off", "lattice, eval_substeps 16"}
    assert len(result["per_seed"]) == 2 and set(result["summary"]) == arms
    for seed in result["per_seed"]:
        for values in seed.values():
            assert 0 <= values["exact_match"] <= values["token_accuracy"] <= 1
    # seed 0's lattice over training: the animation, the per-head histories, the delimiter wave
    for name, magic in (
        ("lattice_phases.gif", b"GIF8"),
        ("lattice_heads.png", b"\x89PNG"),
        ("delimiter_wave.png", b"\x89PNG"),
    ):
        assert (tmp_path / name).read_bytes()[:4] == magic
    history = (tmp_path / "lattice_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [0, 1, 2, 3]


@pytest.mark.parametrize("half", [1, 5])
def test_a_copy_reverse_sequence_is_its_half_a_delimiter_and_the_half_reversed(half):
    cr = example()
    rows = cr.copy_reverse(3, half, 16, torch.Generator().manual_seed(0))
    assert rows.shape == (3, 2 * half + 1) and (rows[:, half] == 16).all()
    torch.testing.assert_close(rows[:, half + 1 :], rows[:, :half].flip(1))
