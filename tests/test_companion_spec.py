"""`kind: companion` (docs/designs.md, design 004): a geolip companion attached to a host.

    nodes:
      host: {kind: transformer, width: 32, heads: 4}
      geo:  {kind: companion, rows: 8}
    edges:
      - {from: host, to: geo, kind: companion}

The companion reads the host's token states, reconstructs them through its rigid spherical code,
and adds its loss to `model.auxiliary_loss()`; the outputs never depend on it.
"""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.tools.checkpoint import load_checkpoint, save_checkpoint
from runtime.companion import GeoCompanion

SPEC = """
spec: 1
name: geo
inputs:
  text: {{kind: tokens, vocab: 40, context: 32}}
nodes:
  host: {{kind: transformer, width: 32, heads: 4, layers: 1{host}}}
{companion}
edges:
  - {{from: host, to: geo, kind: companion}}
outputs:
  logits: {{from: host, kind: lm_head}}
"""
COMPANION = "  geo: {kind: companion, rows: 8, hidden: 32, heads: 2%s}"


def build(write_spec, companion: str = "", host: str = ""):
    text = SPEC.format(host=host, companion=COMPANION % companion)
    return compiler.build_model(write_spec(text))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(0))


def host_states(model, x):
    """The host's token states, computed the long way round, through the federation alone."""
    embedded = {name: module(x) for name, module in model.inputs.items()}
    g, m = model.companion_wiring["geo"].host
    return model.federation(embedded)[g][m]


def test_a_companion_is_a_geo_companion_sized_by_its_host(write_spec):
    model = build(write_spec)
    companion = model.companions["geo"]
    assert isinstance(companion, GeoCompanion)
    assert companion.config.input_width == 32
    assert (companion.config.rows, companion.config.lens_dim, companion.config.heads) == (8, 16, 2)
    assert companion.config.causal  # follows the host, which is causal by default


def test_causal_follows_the_host_unless_the_companion_says(write_spec):
    assert not build(write_spec, host=", causal: false").companions["geo"].config.causal
    assert not build(write_spec, companion=", causal: false").companions["geo"].config.causal


def test_the_companion_reconstructs_the_hosts_states(write_spec):
    model = build(write_spec)
    x = tokens()
    model(x)
    features, output = model.companion_outputs["geo"]
    expected = host_states(model, x)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    again = model.companions["geo"](expected)
    torch.testing.assert_close(output.reconstruction, again.reconstruction, rtol=0, atol=0)
    assert output.reconstruction.shape == (2, 12, 32)


def test_a_companion_only_observes_the_outputs_equal_those_without_it(write_spec, tmp_path):
    with_companion = build(write_spec)
    plain_text = (
        SPEC.format(host="", companion="")
        .replace("  - {from: host, to: geo, kind: companion}\n", "")
        .replace("edges:\n", "")
    )
    plain = compiler.build_model(write_spec(plain_text, "plain.yaml"))
    x = tokens()
    torch.testing.assert_close(with_companion(x)["logits"], plain(x)["logits"], rtol=0, atol=0)


def test_the_auxiliary_loss_is_the_weighted_reconstruction_loss(write_spec):
    model = build(write_spec, companion=", weight: 0.25, cosine_weight: 0.5")
    model(tokens())
    features, output = model.companion_outputs["geo"]
    expected = 0.25 * model.companions["geo"].loss(features, output)
    torch.testing.assert_close(model.auxiliary_loss(), expected)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_decides_whether_the_companion_trains_the_host(write_spec, detach):
    model = build(write_spec, companion=f", detach: {str(detach).lower()}")
    model(tokens())
    model.auxiliary_loss().backward()
    host = [p for n, p in model.named_parameters() if n.startswith("federation.transformers.")]
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in host)
    assert reached is not detach
    companion = list(model.companions["geo"].parameters())
    assert all(p.grad is not None for p in companion if p.requires_grad)


def test_metrics_report_cosine_rigidity_and_alpha(write_spec):
    model = build(write_spec)
    assert model.companion_metrics() == {}  # nothing observed before a forward pass
    model(tokens())
    metrics = model.companion_metrics()["geo"]
    assert metrics["rigidity_envelope"] == pytest.approx(0.02 * 2)  # 0.02 * sqrt(sphere_dim 4)
    assert metrics["mean_alpha"] == pytest.approx(0.024, rel=1e-4)
    assert -1 <= metrics["reconstruction_cosine"] <= 1
    assert 0 <= metrics["in_envelope_fraction"] <= 1


def test_compile_counts_the_companion_in_the_total(write_spec):
    path = write_spec(SPEC.format(host="", companion=COMPANION % ""))
    ir = compiler.analyze(path)
    model = compiler.build_model(ir)
    built = sum(p.numel() for p in model.parameters())
    assert ir.facts.parameters == built
    assert ir.facts.companion_estimates["geo"]["parameters"] == sum(
        p.numel() for p in model.companions["geo"].parameters()
    )


def test_checkpoints_carry_the_companion(write_spec, tmp_path):
    model = build(write_spec)
    with torch.no_grad():
        for p in model.companions["geo"].parameters():
            p.add_(0.01)
    save_checkpoint(model, tmp_path / "run")
    loaded = load_checkpoint(tmp_path / "run")
    for (name, a), (_, b) in zip(
        model.companions.state_dict().items(), loaded.companions.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (", alpha_max: 1.5", "`alpha_max` is 1.5, which is too large: it must be at most 1"),
        (", alpha_init: 0.3", "`alpha_init: 0.3` lies above `alpha_max: 0.2`"),
        (", lens_dim: 9", "`heads: 2` does not divide companion `geo`'s `lens_dim: 9`"),
        (", sphere_dim: 20", "an isometric lens cannot narrow"),
    ],
)
def test_companion_shapes_and_bounds_are_located_errors(spec_errors, snippet, message):
    errors = spec_errors(SPEC.format(host="", companion=COMPANION % snippet))
    assert message in errors
    assert errors.startswith("spec.yaml:7:")  # the companion's line
