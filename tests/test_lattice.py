"""Lattice layouts (docs/designs.md, design 002): `attention: {kind: lattice}`.

Heads sit on a lattice, each a Kuramoto oscillator; head `h`'s scores gain
`strength_h * cos(theta_h + nu_h * (i - j))`, folded into Q/K as two extra dimensions.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

import compiler
from compiler.passes.estimate import transformer_parameters
from compiler.passes.plan import component_choice
from runtime.attention.lattice import (
    LatticeAttention,
    LatticeConfig,
    LatticeOscillators,
    lattice_distances,
)
from runtime.transformer import RotaryEmbedding, Transformer, TransformerConfig

ROOT = Path(__file__).resolve().parent.parent


def lattice_spec(tmp_path: Path, attention: str, nodes: str = "body", heads: int = 4) -> Path:
    body = "\n".join(
        f"  {name}: {{kind: transformer, width: 64, heads: {heads}, layers: 2, attention: {attention}}}"
        for name in nodes.split()
    )
    path = tmp_path / "lattice.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            spec: 1
            name: lattice-test
            inputs:
              tokens: {kind: tokens, vocab: 40, context: 64}
            nodes:
            """
        )
        + body
        + f"\noutputs:\n  logits: {{from: [{', '.join(nodes.split())}], kind: regression, width: 3}}\n"
    )
    return path


LATTICE = "{kind: lattice, lattice: {shape: [2, 2]}, oscillator: {coupling: 0.5, substeps: 3}}"


def naive_attention(attn: LatticeAttention, x: torch.Tensor, rotary) -> torch.Tensor:
    """The design's formula with a dense bias: softmax(q.k/sqrt(d) + alpha cos(theta + nu (i-j)))."""
    members, batch, n, _ = x.shape
    h, hw, cw = attn.heads, attn.head_width, attn.content_width
    q, k, v = attn.qkv(x).split((h * cw, h * cw, h * hw), dim=-1)
    q = q.reshape(members * batch, n, h, cw).transpose(1, 2)
    k = k.reshape(members * batch, n, h, cw).transpose(1, 2)
    v = v.reshape(members * batch, n, h, hw).transpose(1, 2)
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    theta = attn.lattice.phases()  # (members, heads)
    nu = attn.lattice.cfg.token_frequency * attn.lattice.omega
    alpha = attn.lattice.strength
    i = torch.arange(n, dtype=torch.float32)
    offset = i[:, None] - i[None, :]
    bias = alpha[..., None, None] * torch.cos(theta[..., None, None] + nu[..., None, None] * offset)
    bias = bias[:, None].expand(members, batch, h, n, n).reshape(members * batch, h, n, n)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hw) + bias
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.proj(y.transpose(1, 2).reshape(members, batch, n, h * hw))


def rotary_choice(kind: str):
    from compiler.components import Givens

    return component_choice("rotary", Givens()) if kind == "givens" else None


@pytest.mark.parametrize(
    ("members", "width", "position", "rotary", "bias"),
    [
        (1, 64, "rope", None, False),  # RoPE turns the content pairs, leaving the phase slots
        (3, 64, "rope", None, True),
        (2, 64, "none", None, True),
        (1, 60, "none", None, False),  # head width 15: odd content width, slots at the end
        (3, 64, "rope", "givens", True),  # a registered rotary: content rotated, then concatenated
    ],
)
def test_the_fused_phase_term_equals_a_dense_bias(members, width, position, rotary, bias):
    cfg = TransformerConfig(
        width=width,
        heads=4,
        layers=1,
        context=32,
        position=position,
        bias=bias,
        rotary=rotary_choice(rotary) if rotary else None,
        attention=LatticeConfig(shape=(2, 2), substeps=2),
    )
    model = Transformer(cfg, members, rope_scales=tuple(1.0 + m for m in range(members)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and strengths off their initial values
        model.blocks[0].attn.lattice.strength.uniform_(0.5, 2.0)
    attn = model.blocks[0].attn
    # the reference rotates `d_head - 2`-wide content heads with its own RoPE of that width
    reference = model.rotary
    if position == "rope" and rotary is None:
        scales = tuple(1.0 + m for m in range(members))
        reference = RotaryEmbedding(cfg.content_width, 32, cfg.rope_theta, scales)
    x = torch.randn(members, 2, 20, width)
    fused = attn(x, model.rotary)
    torch.testing.assert_close(fused, naive_attention(attn, x, reference), rtol=1e-5, atol=1e-5)


def test_the_phase_term_matters_and_the_coupling_learns():
    """Unlike the original's constant-per-head bias, the term changes the attention, and gradients
    reach the coupling strength and the lattice constant through the Kuramoto updates."""
    cfg = TransformerConfig(
        width=64, heads=4, layers=1, context=32, attention=LatticeConfig(shape=(4,), substeps=4)
    )
    model = Transformer(cfg)
    x = torch.randn(1, 2, 16, 64)
    y = model(x)
    lattice = model.blocks[0].attn.lattice
    with torch.no_grad():
        lattice.strength.zero_()
    assert not torch.allclose(y, model(x))
    with torch.no_grad():
        lattice.strength.fill_(1.0)
    model(x).square().sum().backward()
    for p in (lattice.coupling, lattice.log_range, lattice.omega, lattice.initial_phase):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_neighbourhoods_on_a_lattice():
    moore = lattice_distances(LatticeConfig(shape=(3, 3)))
    assert (moore.isfinite().sum(-1) == 8).all()  # periodic 3x3: every cell has 8 neighbours
    von_neumann = lattice_distances(LatticeConfig(shape=(3, 3), neighbourhood="von_neumann"))
    assert (von_neumann.isfinite().sum(-1) == 4).all()
    open_ = lattice_distances(LatticeConfig(shape=(3, 3), boundary="open"))
    assert open_.isfinite().sum(-1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    assert open_[0, 4] == pytest.approx(math.sqrt(2))  # diagonal neighbours are farther
    radius = lattice_distances(LatticeConfig(shape=(5, 5), boundary="open", radius=2.0))
    assert radius[12].isfinite().sum() == 12  # the centre: 12 cells within distance 2
    cube = lattice_distances(LatticeConfig(shape=(2, 2, 2), neighbourhood="von_neumann"))
    assert (cube.isfinite().sum(-1) == 3).all()


def test_kuramoto_dynamics():
    free = LatticeOscillators(LatticeConfig(shape=(2, 3), coupling=0.0, dt=0.1, substeps=5))
    torch.testing.assert_close(free.phases(), free.initial_phase + 0.5 * free.omega)
    coupled = LatticeOscillators(LatticeConfig(shape=(2, 3), coupling=5.0, dt=0.1, substeps=200))
    with torch.no_grad():
        coupled.initial_phase.copy_(torch.linspace(0, 2.5, 6)[None])
    start = LatticeOscillators(LatticeConfig(shape=(2, 3), substeps=1))
    with torch.no_grad():
        start.initial_phase.copy_(coupled.initial_phase)
    assert coupled.order_parameter() > 0.99 > start.order_parameter()


def test_parameter_count_of_lattice_transformers():
    for frequencies in ("learned", "fixed"):
        cfg = TransformerConfig(
            width=64,
            heads=8,
            layers=2,
            context=16,
            bias=True,
            attention=LatticeConfig(shape=(2, 4), frequencies=frequencies),
        )
        assert transformer_parameters(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_a_lattice_spec_compiles_groups_and_trains(tmp_path):
    model = compiler.build_model(lattice_spec(tmp_path, LATTICE, nodes="a b"))
    assert len(model.federation.plan.groups) == 1  # two same-shaped lattice nodes: one batched call
    ids = torch.randint(0, 40, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.randn(2, 16, 3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(ids)["logits"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_gallery_lattice_spec():
    ir = compiler.analyze(ROOT / "specs" / "lattice_oscillator.yaml")
    cfg = ir.graph.nodes["nodes.body"]["config"]
    assert cfg.attention is not None and cfg.attention.cells == cfg.heads


# ------------------------------------------------------------------ training terms and metrics


def test_the_specs_training_terms_and_their_schedules(tmp_path):
    from runtime.attention.lattice import lattice_regularisation, schedule_factor

    attention = (
        "{kind: lattice, lattice: {shape: [2, 2]}, training: {phase: {weight: 0.5, target: diversity,"
        " schedule: warmup, steps: 10}, coherence: {weight: 2.0, schedule: cosine, steps: 4}}}"
    )
    model = compiler.build_model(lattice_spec(tmp_path, attention))
    layers = [m for m in model.modules() if hasattr(m, "regularisation")]
    assert len(layers) == 2  # one lattice per attention layer
    # step 2: the warm-up is at 2/10, the cosine decay halfway (0.5)
    expected = sum(
        0.5 * 0.2 * layer.order_parameter().mean() + 2.0 * 0.5 * layer.coherence().mean()
        for layer in layers
    )
    torch.testing.assert_close(lattice_regularisation(model, 2), expected)
    assert schedule_factor("anneal", 10, 5) == 0.5 and schedule_factor("constant", 10, 99) == 1.0
    # synchrony pulls phases together: minimising it raises the order parameter
    sync = compiler.build_model(
        lattice_spec(
            tmp_path,
            "{kind: lattice, lattice: {shape: [2, 2]}, training: {phase: {weight: 1.0}}}",
        )
    )
    before = layers_of(sync)[0].order_parameter().mean().item()
    optimizer = torch.optim.SGD(sync.parameters(), lr=0.5)
    for step in range(30):
        loss = lattice_regularisation(sync, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert layers_of(sync)[0].order_parameter().mean().item() > max(before, 0.95)


def layers_of(model):
    from runtime.attention.lattice import lattice_layers

    return [layer for _, layer in lattice_layers(model)]


def test_metrics_per_layer(tmp_path):
    from runtime.attention.lattice import lattice_metrics

    model = compiler.build_model(lattice_spec(tmp_path, LATTICE))
    for layer in layers_of(model):
        layer.record_entropy = True
    model(torch.randint(0, 40, (2, 16)))
    metrics = lattice_metrics(model)
    assert len(metrics) == 2
    for values in metrics.values():
        assert 0 <= values["order_parameter"] <= 1
        assert 0 <= values["attention_entropy"] <= math.log(16)
        assert values["coupling_force"] >= 0 and values["incoherence"] >= 0


def test_checkpoints_keep_phases_and_fixed_frequencies(tmp_path):
    from compiler.tools.checkpoint import load_checkpoint, save_checkpoint

    attention = "{kind: lattice, lattice: {shape: [2, 2]}, oscillator: {frequencies: fixed}}"
    model = compiler.build_model(lattice_spec(tmp_path, attention)).eval()
    with torch.no_grad():
        for layer in layers_of(model):
            layer.omega.uniform_(0.5, 2.0)  # a buffer: must travel with the weights
            layer.initial_phase.uniform_(0, 6)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt")).eval()
    ids = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(loaded(ids)["logits"], model(ids)["logits"], rtol=0, atol=0)


def test_evaluation_takes_eval_substeps_kuramoto_updates(tmp_path):
    """`oscillator.eval_substeps`: more oscillator steps at test time than in training (AKOrN,
    Miyato et al. 2025); `model.eval()` switches, `model.train()` switches back."""
    from runtime.attention.lattice import kuramoto_phases

    attention = (
        "{kind: lattice, lattice: {shape: [2, 2]},"
        " oscillator: {coupling: 2.0, substeps: 2, eval_substeps: 12}}"
    )
    model = compiler.build_model(lattice_spec(tmp_path, attention))
    layer = layers_of(model)[0]

    def after(steps: int) -> torch.Tensor:
        tensors = layer.oscillator_tensors()
        initial, omega, coupling, log_range, _, distance, neighbour = tensors
        return kuramoto_phases(
            initial, omega, coupling, log_range, distance, neighbour, 0.1, steps
        ).detach()

    ids = torch.randint(0, 40, (2, 16))
    trained = model(ids)["logits"]
    torch.testing.assert_close(layer.last_phase, after(2))
    evaluated = model.eval()(ids)["logits"]
    torch.testing.assert_close(layer.last_phase, after(12))
    torch.testing.assert_close(layer.phases(), after(12))  # the metrics read the same phases
    assert not torch.allclose(trained, evaluated)
    model.train()(ids)
    torch.testing.assert_close(layer.last_phase, after(2))
    # unset, evaluation takes the training's substeps
    plain = compiler.build_model(lattice_spec(tmp_path, LATTICE)).eval()
    assert layers_of(plain)[0].substeps == 3


def test_the_report_gives_every_layer_and_head_as_plain_numbers(tmp_path):
    """`model.report()`'s lattice entries are what training logs (metrics.jsonl, and one
    TensorBoard scalar per number: `lattice/body.blocks.0.attn.lattice/heads/phase/3`): the
    layer's order parameter and the other scalars, and per head its phase, coupling force,
    frequency, gain and (when recorded) attention entropy."""
    model = compiler.build_model(lattice_spec(tmp_path, LATTICE, nodes="a b"))
    for layer in layers_of(model):
        layer.record_entropy = True
    model(torch.randint(0, 40, (2, 16)))
    report = model.report()["nodes"]
    for node in ("a", "b"):  # one batched group: each node reports its own member
        for entry in report[node]["lattice"].values():
            assert 0 <= entry["order_parameter"] <= 1
            heads = entry["heads"]
            assert set(heads) >= {"phase", "coupling_force", "frequency", "strength"}
            assert all(len(values) == 4 for values in heads.values())
            assert all(-math.pi <= p < math.pi for p in heads["phase"])
            phases = torch.tensor(heads["phase"])
            r = torch.polar(torch.ones(4), phases).mean().abs()
            assert r.item() == pytest.approx(entry["order_parameter"], abs=1e-5)
    assert "attention_entropy" in report["a"]["lattice"]["blocks.0.attn.lattice"]["heads"]
    assert report["a"]["lattice"] != report["b"]["lattice"]
