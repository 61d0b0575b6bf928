"""Components (docs/designs.md, design 003): named parts a spec picks by `kind`.

    nodes:
      body:
        kind: transformer
        attention: {kind: sliding_window, window: 64}
        rotary: {kind: quaternion}
        variations: {activation: [gelu, relu], heads: [4, 8], dropout: {min: 0.1, max: 0.3}}
    train:
      optimizer: {kind: fam, lr: 1.0e-3}
      schedule: {kind: warmup_cosine, warmup: 100}

Every component is a pydantic config registered with a builder; Python code adds its own with
`@compiler.register(...)` and packages through the `epicycle.components` entry-point group.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

import compiler
from compiler.language import registry
from compiler.language.registry import REGISTRY, ComponentConfig, UnknownComponent

ROOT = Path(__file__).resolve().parent.parent

BASE = """
spec: 1
name: parts
seed: 5
defaults:
  transformer: {layers: 2}
inputs:
  tokens: {kind: tokens, vocab: 29, context: 32}
nodes:
  body: {kind: transformer, width: 32, heads: 4, %s}
outputs:
  logits: {from: body, kind: lm_head}
"""

ATTENTIONS = [
    "{kind: sdpa}",
    "{kind: sliding_window, window: 5}",
    "{kind: adaptive_span, ramp: 4, init: 0.5, span_loss: 0.01}",
    "{kind: local_global, window: 4, global_tokens: 2}",
    "{kind: relative_force, hop_levels: 2}",
    "{kind: myelinated, sublayers: 2}",
]
ROTARIES = [
    "{kind: rope}",
    "{kind: learned_rope}",
    "{kind: givens, pairs: adjacent}",
    "{kind: quaternion, axes: learned}",
]


def _train_step(model: nn.Module, tokens: torch.Tensor) -> float:
    logits = model(tokens)["logits"]
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 29), tokens[:, 1:].reshape(-1))
    (loss + model.auxiliary_loss(0)).backward()
    return float(loss.detach())


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_component_compiles_runs_and_learns(write_spec, attention):
    model = compiler.build_model(write_spec(BASE % f"attention: {attention}"))
    tokens = torch.randint(0, 29, (2, 12))
    _train_step(model, tokens)
    grads = [p.grad for p in model.federation.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("rotary", ROTARIES)
def test_every_rotary_component_compiles_and_runs(write_spec, rotary):
    model = compiler.build_model(write_spec(BASE % f"rotary: {rotary}"))
    out = model(torch.randint(0, 29, (2, 12)))["logits"]
    assert out.shape == (2, 12, 29) and torch.isfinite(out).all()


def test_sdpa_is_the_default_computation(write_spec):
    plain = compiler.build_model(write_spec(BASE % "causal: true", "a.yaml"))
    chosen = compiler.build_model(write_spec(BASE % "attention: {kind: sdpa}", "b.yaml"))
    tokens = torch.randint(0, 29, (2, 12))
    torch.testing.assert_close(plain(tokens)["logits"], chosen(tokens)["logits"])


def test_a_window_as_wide_as_the_context_is_plain_causal_attention(write_spec):
    plain = compiler.build_model(write_spec(BASE % "causal: true", "a.yaml"))
    wide = compiler.build_model(
        write_spec(BASE % "attention: {kind: sliding_window, window: 32}", "b.yaml")
    )
    tokens = torch.randint(0, 29, (2, 12))
    torch.testing.assert_close(plain(tokens)["logits"], wide(tokens)["logits"])


def test_rope_by_name_equals_the_default_and_learned_rope_starts_there(write_spec):
    default = compiler.build_model(write_spec(BASE % "causal: true", "a.yaml"))
    named = compiler.build_model(write_spec(BASE % "rotary: {kind: rope}", "b.yaml"))
    learned = compiler.build_model(write_spec(BASE % "rotary: {kind: learned_rope}", "c.yaml"))
    tokens = torch.randint(0, 29, (2, 12))
    reference = default(tokens)["logits"]
    torch.testing.assert_close(named(tokens)["logits"], reference)
    torch.testing.assert_close(learned(tokens)["logits"], reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- variations

VARIED = BASE % (
    "layers: 6, variations: {activation: [gelu, relu, silu], heads: [2, 4, 8], "
    "dropout: {min: 0.1, max: 0.3}, norm: [layernorm, rmsnorm]}"
)


def test_variations_are_drawn_per_layer_from_the_seed_and_shown_in_the_config(write_spec):
    first = compiler.analyze(write_spec(VARIED, "a.yaml"))
    again = compiler.analyze(write_spec(VARIED, "b.yaml"))
    layers = first.graph.nodes["nodes.body"]["config"].layer_settings
    assert layers == again.graph.nodes["nodes.body"]["config"].layer_settings
    assert len(layers) == 6
    assert {layer.heads for layer in layers} <= {2, 4, 8}
    assert all(0.1 <= layer.dropout <= 0.3 for layer in layers)
    assert len({(layer.activation, layer.heads, layer.norm) for layer in layers}) > 1
    other_seed = compiler.analyze(write_spec(VARIED.replace("seed: 5", "seed: 6"), "c.yaml"))
    assert other_seed.graph.nodes["nodes.body"]["config"].layer_settings != layers

    model = compiler.build_model(write_spec(VARIED, "a.yaml"))
    transformer = model.federation.transformers[0]
    assert transformer.cfg.layer_settings == layers  # the compiled module's config holds them
    for block, layer in zip(transformer.blocks, layers, strict=True):
        assert block.attn.cfg.heads == layer.heads
        assert block.mlp.cfg.activation == layer.activation
        assert block.norm_mlp.kind == layer.norm
        assert block.dropout == layer.dropout
    assert model(torch.randint(0, 29, (2, 12)))["logits"].shape == (2, 12, 29)


def test_compile_prints_what_each_layer_drew(write_spec):
    path = write_spec(VARIED)
    layers = compiler.analyze(path).graph.nodes["nodes.body"]["config"].layer_settings
    result = subprocess.run(
        [sys.executable, "-m", "compiler.tools.cli", "compile", str(path), "--no-smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for i, layer in enumerate(layers):
        assert (
            f"body layer {i}: activation {layer.activation}, heads {layer.heads}, "
            f"dropout {layer.dropout:g}, norm {layer.norm}"
        ) in result.stdout


def test_parameter_counts_follow_the_drawn_layers(write_spec):
    ir = compiler.analyze(write_spec(VARIED))
    model = compiler.build_model(write_spec(VARIED))
    assert ir.facts.parameters == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the registry


class Doubled(ComponentConfig):
    """Attention scores doubled before the softmax (a test component)."""

    kind: Literal["doubled"] = "doubled"
    factor: float = 2.0


class DoubledAttention(nn.Module):
    def __init__(self, heads, kv_heads, head_width, context, members, factor):
        super().__init__()
        self.factor = factor

    def forward(self, q, k, v, causal, dropout_p=0.0):
        return nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=self.factor / q.shape[-1] ** 0.5
        )


@pytest.fixture
def doubled():
    register = compiler.register("attention", config=Doubled, level="scores")
    register(DoubledAttention)
    yield
    del REGISTRY.families["attention"]["doubled"]


def test_a_component_registered_from_python_is_usable_and_documented(write_spec, doubled):
    model = compiler.build_model(write_spec(BASE % "attention: {kind: doubled, factor: 3.0}"))
    assert isinstance(model.federation.transformers[0].blocks[0].attn.core, DoubledAttention)
    assert model.federation.transformers[0].blocks[0].attn.core.factor == 3.0
    schema = compiler.json_schema()
    assert {"$ref": "#/$defs/Doubled"} in schema["$defs"]["AttentionComponent"]["oneOf"]


def test_a_registered_components_config_errors_are_located(spec_errors, doubled):
    errors = spec_errors(BASE % "attention: {kind: doubled, factr: 3.0}")
    assert "spec.yaml:9:77: error: unknown key `factr` in `nodes.body.attention`" in errors
    assert "did you mean `factor`?" in errors


def test_components_arrive_through_entry_points(monkeypatch):
    class Plugged(ComponentConfig):
        kind: Literal["plugged"] = "plugged"

    class Point:
        value = "a_package.components:install"

        def load(self):
            return lambda reg: reg.register("rotary", config=Plugged)(lambda **kw: nn.Identity())

    monkeypatch.setattr(
        registry, "entry_points", lambda group: [Point()] if group == "epicycle.components" else []
    )
    monkeypatch.setattr(REGISTRY, "loaded", False)  # as in a fresh process
    try:
        rotaries = REGISTRY.family("rotary")
        assert rotaries["plugged"].config is Plugged
        assert "rope" in rotaries  # the built-ins stay
    finally:
        REGISTRY.families["rotary"].pop("plugged", None)


def test_unknown_names_suggest_the_nearest(spec_errors):
    errors = spec_errors(BASE % "attention: {kind: sliding_windows, window: 4}")
    assert "unknown kind `sliding_windows` in `nodes.body.attention`" in errors
    assert "did you mean `sliding_window`?" in errors
    with pytest.raises(UnknownComponent, match="did you mean `fam`"):
        REGISTRY.get("optimizer", "fma")


def test_a_name_cannot_be_registered_twice_by_accident():
    class Again(ComponentConfig):
        kind: Literal["sdpa"] = "sdpa"

    with pytest.raises(ValueError, match="already registered"):
        compiler.register("attention", config=Again, level="scores")(lambda **kw: None)


def test_a_config_must_name_its_kind():
    class Nameless(ComponentConfig):
        window: int = 3

    with pytest.raises(ValueError, match="kind"):
        compiler.register("attention", config=Nameless, level="scores")(lambda **kw: None)


# --------------------------------------------------------------------------- training section

TRAINED = (
    BASE % "causal: true"
    + """
train:
  optimizer: {kind: %s}
  schedule: {kind: warmup_cosine, warmup: 3, min_lr: 1.0e-5}
  steps: 20
"""
)


@pytest.mark.parametrize(
    "optimizer",
    ["adamw, lr: 0.01", "sgd, lr: 0.05", "fam, lr: 0.5, fam_start_step: 2, min_size: 16"],
)
def test_the_train_section_builds_its_optimizer_and_schedule(write_spec, optimizer):
    model = compiler.build_model(write_spec(TRAINED % optimizer))
    opt, schedule = compiler.build_optimizer(model)
    assert type(opt).__name__.lower().startswith(optimizer.split(",")[0])
    torch.manual_seed(0)
    tokens = torch.randint(0, 29, (8, 16))
    losses = []
    for _ in range(20):
        losses.append(_train_step(model, tokens))
        compiler.clip_gradients(model)
        opt.step()
        schedule.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.3, losses  # memorising one batch
    assert schedule.get_last_lr()[0] == pytest.approx(1e-5, rel=1e-3)
