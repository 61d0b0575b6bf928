"""The geolip companion (docs/designs.md, design 004): isometry, sphere rows, bounded alpha, the
attention against an explicit-softmax reference, causality, training, meta construction, config
validation, the rigidity metric, and the example's quick run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime.companion import (
    CompanionConfig,
    CompanionOutput,
    GeoCompanion,
    canonical_signs,
    frame_deviation,
    uniform_projective_angle,
)

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 24


def small(**overrides) -> CompanionConfig:
    fields = dict(input_width=WIDTH, rows=8, sphere_dim=4, lens_dim=16, heads=4, hidden=32)
    fields.update(overrides)
    return CompanionConfig(**fields)


def model_of(seed: int = 0, **overrides) -> GeoCompanion:
    torch.manual_seed(seed)
    return GeoCompanion(small(**overrides))


def features(batch: int = 3, tokens: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, WIDTH, generator=torch.Generator().manual_seed(seed))


def assert_isometric(lens, dim: int) -> None:
    g = torch.Generator().manual_seed(3)
    for rows in (F.normalize(torch.randn(5, 9, dim, generator=g), dim=-1), torch.randn(5, 9, dim)):
        lifted = lens(rows)
        torch.testing.assert_close(lifted.norm(dim=-1), rows.norm(dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            lifted @ lifted.transpose(-1, -2), rows @ rows.transpose(-1, -2), atol=1e-5, rtol=0
        )
    e = lens.matrix()
    torch.testing.assert_close(e.T @ e, torch.eye(dim), atol=1e-6, rtol=0)


# -- the lens -----------------------------------------------------------------------------------


def test_lens_is_isometric_at_init_and_after_optimiser_steps():
    model = model_of()
    assert_isometric(model.lens, 4)
    before = model.lens.matrix().detach().clone()
    optimiser = torch.optim.Adam(model.lens.parameters(), lr=0.05)
    x = features()
    for _ in range(5):
        loss = model.loss(x, model(x))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert (model.lens.matrix().detach() - before).abs().max() > 1e-3  # the lens did move
    assert_isometric(model.lens, 4)


def test_fixed_lens_is_a_buffer_and_still_isometric():
    model = model_of(lens_trainable=False)
    assert all("lens" not in name for name, _ in model.named_parameters())
    assert "lens.free" in dict(model.named_buffers())
    assert_isometric(model.lens, 4)


def test_lensed_frame_keeps_rows_gram_and_frame_deviation():
    model = model_of()
    out = model(features())
    torch.testing.assert_close(out.M_lens.norm(dim=-1), torch.ones(3, 7, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.M_lens @ out.M_lens.transpose(-1, -2),
        out.M @ out.M.transpose(-1, -2),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        model.frame_deviation(out.M_lens), model.frame_deviation(out.M), atol=1e-5, rtol=0
    )
    # the spectrum is the column norms of the lensed frame; rows are unit so sum S^2 = rows
    torch.testing.assert_close(out.spectrum, out.M_lens.norm(dim=-2))
    torch.testing.assert_close(out.spectrum.pow(2).sum(-1), torch.full((3, 7), 8.0))


# -- sphere normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize("canonical", [True, False])
def test_rows_of_m_are_on_the_unit_sphere(canonical):
    out = model_of(canonical_signs=canonical)(features())
    assert out.M.shape == (3, 7, 8, 4) and out.M.dtype == torch.float32
    torch.testing.assert_close(out.M.norm(dim=-1), torch.ones(3, 7, 8), atol=1e-6, rtol=0)
    if canonical:
        lead = out.M.gather(-1, (out.M.abs() > 1e-6).to(torch.uint8).argmax(-1, keepdim=True))
        assert (lead > 0).all()


def test_canonical_signs_maps_antipodes_to_one_point():
    rows = F.normalize(torch.randn(50, 4), dim=-1)
    rows[0] = torch.tensor([0.0, -0.6, 0.8, 0.0])
    torch.testing.assert_close(canonical_signs(rows), canonical_signs(-rows))
    assert canonical_signs(rows)[0, 1] == pytest.approx(0.6)


# -- alpha --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha_max, alpha_init", [(0.2, 0.024), (0.2, 0.0), (0.2, 0.2), (1.0, 0.5), (0.05, 0.01)]
)
def test_alpha_starts_at_alpha_init(alpha_max, alpha_init):
    model = model_of(alpha_max=alpha_max, alpha_init=alpha_init, layers=2)
    assert model.alpha.shape == (2, 16)
    assert (model.alpha - alpha_init).abs().max() < 1e-3
    assert model(features()).alpha.shape == (2, 16)


@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["up", "down"])
@pytest.mark.parametrize("optimiser_kind", ["sgd", "adam"])
def test_alpha_stays_bounded_under_an_adversarial_optimiser(direction, optimiser_kind):
    """Drive every alpha up (or down) through the forward pass with a huge step size."""
    model = model_of(layers=2)
    logits = [layer.alpha_logits for layer in model.attention]
    if optimiser_kind == "sgd":
        optimiser = torch.optim.SGD(logits, lr=50.0)
    else:
        optimiser = torch.optim.Adam(logits, lr=1.0)
    x = features()
    for _ in range(60):
        out = model(x)
        objective = -direction * out.alpha.sum()
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        alpha = model.alpha.detach()
        assert (alpha >= 0).all() and (alpha <= 0.2).all()
    extreme = 0.2 if direction > 0 else 0.0
    assert (model.alpha.detach() - extreme).abs().max() < 1e-3  # it was really pushed there
    out = model(x)  # two layers: each mode is rescaled by a factor in [(1 - 0.2)^2, (1 + 0.2)^2]
    assert (out.attended >= out.spectrum * (1 - 0.2) ** 2 - 1e-6).all()
    assert (out.attended <= out.spectrum * (1 + 0.2) ** 2 + 1e-6).all()


def test_alpha_zero_makes_the_attention_path_exactly_identity():
    x = features()
    out = model_of(alpha_max=0.0, alpha_init=0.0)(x)
    assert torch.equal(out.attended, out.spectrum)
    model = model_of(layers=3)
    with torch.no_grad():
        for layer in model.attention:
            layer.alpha_logits.fill_(-float("inf"))
    out = model(x)
    assert torch.equal(out.attended, out.spectrum)


def test_mean_alpha_per_mode_averages_layers():
    model = model_of(layers=2)
    with torch.no_grad():
        model.attention[1].alpha_logits.fill_(-float("inf"))
    torch.testing.assert_close(model.mean_alpha_per_mode(), model.attention[0].alpha / 2)


# -- the spectral-alpha attention ---------------------------------------------------------------


def naive_spectral_alpha(layer, spectrum: torch.Tensor, causal: bool) -> torch.Tensor:
    """S * (1 + alpha * tanh(out(softmax(q k^T / sqrt(dh) + mask) v))) with explicit loops."""
    batch, tokens, width = spectrum.shape
    heads, dh = layer.heads, width // layer.heads
    normed = F.layer_norm(spectrum, (width,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    q, k, v = (normed @ layer.qkv.weight.T + layer.qkv.bias).split(width, dim=-1)
    mixed = torch.zeros(batch, tokens, width, dtype=torch.float64)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = (t[..., cols].double() for t in (q, k, v))
        scores = qh @ kh.transpose(1, 2) / math.sqrt(dh)
        if causal:
            scores = scores.masked_fill(torch.ones(tokens, tokens).triu(1).bool(), -math.inf)
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        mixed[..., cols] = weights @ vh
    gate = torch.tanh(mixed @ layer.out.weight.double().T + layer.out.bias.double())
    alpha = layer.alpha.double()
    return (spectrum.double() * (1 + alpha * gate)).float()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 4, 8])
def test_spectral_alpha_attention_matches_explicit_softmax(causal, heads):
    model = model_of(heads=heads, causal=causal, alpha_init=0.15)
    layer = model.attention[0]
    with torch.no_grad():  # make every mode's alpha different
        layer.alpha_logits.copy_(torch.linspace(-3, 3, 16))
    spectrum = model(features()).spectrum.detach()
    torch.testing.assert_close(
        layer(spectrum), naive_spectral_alpha(layer, spectrum, causal), atol=1e-5, rtol=0
    )


def test_causal_outputs_ignore_later_tokens():
    x = features(tokens=9)
    t = 4
    later = x.clone()
    later[:, t + 1 :] = torch.randn_like(later[:, t + 1 :])
    causal = model_of(causal=True, layers=2, alpha_init=0.2)
    a, b = causal(x), causal(later)
    for field in ("reconstruction", "attended", "M_lens"):
        torch.testing.assert_close(
            getattr(a, field)[:, : t + 1], getattr(b, field)[:, : t + 1], atol=1e-6, rtol=0
        )
    assert (a.reconstruction[:, t + 1 :] - b.reconstruction[:, t + 1 :]).abs().max() > 1e-3
    full = model_of(causal=False, layers=2, alpha_init=0.2)  # control: attention sees the future
    c, d = full(x), full(later)
    assert (c.attended[:, : t + 1] - d.attended[:, : t + 1]).abs().max() > 1e-6


# -- training, dtypes, devices ------------------------------------------------------------------


def test_training_lowers_the_loss():
    model = model_of(hidden=64)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    held_out = torch.randn(4, 8, WIDTH, generator=g)
    with torch.no_grad():
        before = float(model.loss(held_out, model(held_out)))
    for _ in range(40):
        x = torch.randn(8, 8, WIDTH, generator=g)
        loss = model.loss(x, model(x))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(model.loss(held_out, model(held_out)))
    assert after < 0.9 * before
    summary = model.summary(held_out)
    assert summary["reconstruction_cosine"] > 0.2
    assert summary["rigidity_envelope"] == pytest.approx(0.04)


def test_loss_is_mse_plus_weighted_cosine():
    x = features()
    plain = model_of()
    out = plain(x)
    torch.testing.assert_close(plain.loss(x, out), F.mse_loss(out.reconstruction, x))
    weighted = model_of(cosine_weight=0.5)
    out = weighted(x)
    cosine = F.cosine_similarity(out.reconstruction, x, dim=-1).mean()
    torch.testing.assert_close(
        weighted.loss(x, out), F.mse_loss(out.reconstruction, x) + 0.5 * (1 - cosine)
    )
    torch.testing.assert_close(weighted.reconstruction_cosine(x, out), cosine)


def test_bfloat16_autocast_keeps_the_geometry_exact():
    model = model_of()
    x = features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = model.loss(x, out)
    assert out.reconstruction.dtype == torch.bfloat16
    assert out.M.dtype == out.M_lens.dtype == out.spectrum.dtype == torch.float32
    torch.testing.assert_close(out.M_lens.norm(dim=-1), torch.ones(3, 7, 8), atol=1e-5, rtol=0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_meta_device_construction_computes_nothing():
    with torch.device("meta"):
        model = GeoCompanion(CompanionConfig(input_width=768, rows=64, lens_dim=64, hidden=1024))
        out = model(torch.empty(2, 5, 768))
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(out, CompanionOutput)
    assert out.reconstruction.shape == (2, 5, 768) and out.reconstruction.is_meta
    assert out.M.shape == (2, 5, 64, 4) and out.M_lens.shape == (2, 5, 64, 64)
    assert out.spectrum.shape == out.attended.shape == (2, 5, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = model_of()
    x = features()
    reference = model(x)
    model = model.cuda()
    out = model(x.cuda())
    torch.testing.assert_close(
        out.reconstruction.cpu(), reference.reconstruction, atol=1e-4, rtol=1e-4
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.cuda())
    torch.testing.assert_close(
        out.M_lens.norm(dim=-1), torch.ones(3, 7, 8, device="cuda"), atol=1e-5, rtol=0
    )
    assert out.reconstruction.dtype == torch.bfloat16


# -- the rigidity metric ------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3, 4, 16])
def test_uniform_baseline_is_the_expected_projective_angle(dim):
    g = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn(1500, dim, generator=g, dtype=torch.float64), dim=-1)
    i, j = torch.triu_indices(1500, 1500, offset=1)
    sampled = torch.acos((points @ points.T)[i, j].abs().clamp(max=1)).mean()
    assert uniform_projective_angle(dim) == pytest.approx(float(sampled), abs=3e-3)
    if dim == 2:
        assert uniform_projective_angle(2) == pytest.approx(math.pi / 4, abs=1e-12)
    if dim == 4:
        assert uniform_projective_angle(4) == pytest.approx(math.pi / 4 + 1 / math.pi, abs=1e-9)


def test_frame_deviation_extremes_and_envelope():
    same = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(6, 4)
    # identical (or antipodal) rows: every projective angle is 0
    assert float(frame_deviation(same, 4)) == pytest.approx(-uniform_projective_angle(4), abs=1e-3)
    orthogonal = torch.eye(4)
    assert float(frame_deviation(orthogonal, 4)) == pytest.approx(
        math.pi / 2 - uniform_projective_angle(4), abs=1e-5
    )
    model = model_of()
    assert model.rigidity_envelope == pytest.approx(0.02 * math.sqrt(4))
    frames = torch.stack([same, torch.cat([orthogonal, -orthogonal[:2]])])
    assert model.in_envelope(frames).tolist() == [False, False]
    uniform = F.normalize(
        torch.randn(1, 20000, 4, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    assert bool(model.in_envelope(uniform[:, :400]))
    m = F.normalize(torch.randn(2, 3, 8, 4), dim=-1).requires_grad_()
    frame_deviation(m, 4).sum().backward()
    assert torch.isfinite(m.grad).all()


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"input_width": 0}, "input_width"),
        ({"rows": 1}, "rows"),
        ({"sphere_dim": 1}, "sphere_dim"),
        ({"lens_dim": 3}, "lens_dim"),
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"layers": 0}, "layers"),
        ({"hidden": -1}, "hidden"),
        ({"depth": -1}, "depth"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"alpha_max": -0.1, "alpha_init": 0.0}, "alpha_max"),
        ({"alpha_init": 0.3}, "alpha_init"),
        ({"alpha_init": -0.01}, "alpha_init"),
        ({"alpha_init": float("nan")}, "alpha_init"),
        ({"cosine_weight": -1.0}, "cosine_weight"),
        ({"rows": 2.5}, "rows"),
        ({"causal": 1}, "causal"),
    ],
)
def test_invalid_configs_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small(**overrides)


def test_config_defaults_follow_the_design():
    c = CompanionConfig(input_width=768)
    assert (c.rows, c.sphere_dim, c.lens_dim, c.heads) == (32, 4, 16, 4)
    assert (c.alpha_max, c.alpha_init, c.causal) == (0.2, 0.024, False)
    with pytest.raises(ValueError, match="features"):
        GeoCompanion(small())(torch.randn(2, 3, WIDTH + 1))


# -- the example --------------------------------------------------------------------------------


def test_example_quick_run_writes_both_datasets(tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "geolip_companion.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "geolip_companion.json").read_text())["results"]
    assert {"independent", "correlated"} <= set(results)
    for result in results.values():
        for when in ("start", "end"):
            figures = result[when]
            assert -1 <= figures["reconstruction_cosine"] <= 1
            assert math.isfinite(figures["frame_deviation"])
            assert 0 <= figures["mean_alpha"] <= 0.2
        assert abs(result["start"]["mean_alpha"] - 0.024) < 1e-3
        assert len(result["history"]["alpha_mean"]) == len(result["history"]["step"]) > 2
    assert (tmp_path / "geolip_companion_alpha.png").stat().st_size > 0
