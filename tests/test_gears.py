"""Gears (docs/designs.md, design 000): exact trains, contradictions, rotating heads, feedback."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import compiler
from runtime.perspective import Perspective
from runtime.transformer import RotaryEmbedding

TRAIN = """
spec: 1
name: train
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  t: {kind: features, width: 4, context: 16}
nodes:
  b1: {kind: gear, teeth: 223}
  b2: {kind: gear, teeth: 64}
  c1: {kind: gear, teeth: 38}
  c2: {kind: gear, teeth: 48}
  d1: {kind: gear, teeth: 24}
  moon: {kind: gear, ratio: 254/19}
edges:
  - {from: b1, to: b2, kind: arbor}
  - {from: b2, to: c1, kind: mesh}
  - {from: c1, to: c2, kind: arbor}
  - {from: c2, to: d1, kind: mesh}
  - {from: d1, to: moon}
outputs:
  y: {from: moon, kind: regression, width: 2}
"""


def velocities(ir) -> dict[str, Fraction]:
    return {d["name"]: d["velocity"] for _, d in ir.vertices("node") if "velocity" in d}


def test_velocities_multiply_tooth_ratios_along_the_train(write_spec):
    ir = compiler.analyze(write_spec(TRAIN))
    assert velocities(ir) == {
        "b1": 1,
        "b2": 1,
        "c1": Fraction(64, 38),
        "c2": Fraction(64, 38),
        "d1": Fraction(64 * 48, 38 * 24),
        "moon": Fraction(254, 19),
    }


def test_a_message_edge_between_gears_is_conditioned_on_their_derived_ratio(write_spec):
    ir = compiler.analyze(write_spec(TRAIN))
    edge = ir.facts.federation.edges[-1]  # d1 -> moon, a plain message edge
    assert edge.ratio == pytest.approx(float(Fraction(254, 19) / Fraction(64 * 48, 38 * 24)))


def test_two_paths_that_disagree_are_an_error_naming_both(spec_errors):
    text = TRAIN.replace(
        "  - {from: d1, to: moon}", "  - {from: d1, to: moon, kind: mesh, ratio: 4}"
    )
    assert spec_errors(text) == (
        "spec.yaml:17:5: error: the gear train contradicts itself: `c2` turns 127/76 per driver turn via "
        "`moon` (its `ratio`) -> `d1` -> `c2` (1/4 * 1/2), but 32/19 via `b1` (the driver) -> `b2` -> `c1` "
        "-> `c2` (1 * 32/19 * 1)\n"
        "  help: fix a tooth count or an explicit `ratio`, or break the extra path "
        "(use `kind: message` for an edge that carries messages but no motion)"
    )


def test_the_first_gear_is_the_driver_and_a_separate_train_drives_itself(write_spec):
    text = TRAIN.replace(
        "  moon: {kind: gear, ratio: 254/19}",
        "  moon: {kind: gear, teeth: 10}\n  x: {kind: gear, teeth: 5}",
    )
    text = text.replace(
        "  - {from: d1, to: moon}", "  - {from: moon, to: x, kind: mesh}\n  - {from: x, to: d1}"
    )
    v = velocities(compiler.analyze(write_spec(text)))
    assert v["b1"] == 1 and v["moon"] == 1 and v["x"] == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (("teeth: 64}", "teeth: 64, position: learned}"), "a gear's heads turn at its velocity"),
        (("ratio: 254/19}", "ratio: 0}"), "a ratio must be positive, got 0"),
        (("ratio: 254/19}", "ratio: 1/0}"), "division by zero"),
        (("teeth: 223}", "teeth: 0}"), "`teeth` is 0: it must be at least 1"),
        (
            ("{from: b2, to: c1, kind: mesh}", "{from: b2, to: c1, kind: mesh, ratio: -2}"),
            "must be positive",
        ),
        (("moon: {kind: gear,", "moon: {kind: transformer,"), None),
        (("ratio: 254/19}", "ratio: 254/19, perspective: lunr}"), "no perspective named `lunr`"),
        (("{from: d1, to: moon}", "{from: d1, to: mooon}"), "no node named `mooon`"),
    ],
)
def test_bad_gears_are_located_errors(spec_errors, change, message):
    text = TRAIN.replace(*change)
    if message is None:  # `ratio` is not a transformer key
        assert "unknown key `ratio` in `nodes.moon`" in spec_errors(text)
    else:
        assert message in spec_errors(text)


def test_mesh_edges_join_gears_only(spec_errors):
    text = TRAIN.replace("b2: {kind: gear, teeth: 64}", "b2: {kind: transformer}")
    assert "a `arbor` edge joins gears, but `b2` is a transformer" in spec_errors(text)


def test_gear_heads_rotate_at_the_gears_velocity():
    """Member m's rotary phase at position p is RoPE's phase at position velocity[m] * p."""
    rope = RotaryEmbedding(8, 16, 10000.0, scales=(1.0, 254 / 19))
    plain = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    positions = torch.arange(16, dtype=torch.float64)
    expected = torch.cos(254 / 19 * torch.outer(positions, plain)).float()
    torch.testing.assert_close(rope.cos[1], expected)
    torch.testing.assert_close(rope.cos[0], torch.cos(torch.outer(positions, plain)).float())
    x = torch.randn(2 * 3, 2, 16, 8)  # (members * batch, heads, tokens, head_width)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))  # rotations keep norms


def test_a_rotation_perspective_is_a_rotation():
    frame = Perspective("rotation", 12)
    assert torch.equal(frame.matrix(), torch.eye(12))  # starts as the identity
    with torch.no_grad():
        frame.generator.normal_()
    r = frame.matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(12), atol=1e-5, rtol=0)
    assert torch.det(r).item() == pytest.approx(1.0, abs=1e-4)


LOOP = """
spec: 1
name: loop
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  t: {kind: features, width: 4, context: 16}
nodes:
  a: {kind: gear, teeth: 20}
  b: {kind: gear, teeth: 10}
edges:
  - {from: a, to: b, kind: mesh}
  - {from: b, to: a, kind: feedback, delay: 1}
feedback: {steps: STEPS, mode: MODE}
outputs:
  y: {from: [a, b], kind: regression, width: 3}
"""


def loop_model(steps: int, mode: str, extra: str = "") -> torch.nn.Module:
    """A two-gear loop made contractive (a strong input, a weak feedback message), so a fixed point exists."""
    text = LOOP.replace("STEPS", str(steps)).replace("MODE", mode + extra)
    model = compiler.build_model(compiler.load_spec_text(text))
    with torch.no_grad():
        model.inputs["t"].proj.weight.normal_(std=1.0)
        model.federation.messages.lin.weight.mul_(0.05)
    return model


def test_equilibrium_finds_the_fixed_point_that_unrolling_converges_to():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    eq = loop_model(50, "equilibrium", ", tolerance: 1.0e-6")
    unrolled = loop_model(50, "unroll")
    unrolled.load_state_dict(eq.state_dict())
    torch.testing.assert_close(eq(x)["y"], unrolled(x)["y"], atol=1e-5, rtol=1e-4)
    assert eq.federation.last_iterations < 50 and eq.federation.last_residual < 1e-6


def test_equilibrium_gradients_match_the_converged_unrolled_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    eq = loop_model(60, "equilibrium", ", tolerance: 1.0e-7")
    unrolled = loop_model(60, "unroll")
    unrolled.load_state_dict(eq.state_dict())
    for model in (eq, unrolled):
        model(x)["y"].square().sum().backward()
    for (name, p), q in zip(eq.named_parameters(), unrolled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)


def saved_bytes(model, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(x)["y"].sum()
    return total


def test_equilibrium_memory_does_not_grow_with_steps_but_unrolling_does():
    x = torch.randn(2, 8, 4)
    assert saved_bytes(loop_model(32, "equilibrium"), x) == saved_bytes(
        loop_model(4, "equilibrium"), x
    )
    assert saved_bytes(loop_model(32, "unroll"), x) > 7 * saved_bytes(loop_model(4, "unroll"), x)


def test_equilibrium_reports_when_it_does_not_converge(caplog):
    text = LOOP.replace("STEPS", "3").replace("MODE", "equilibrium, tolerance: 1.0e-9")
    model = compiler.build_model(compiler.load_spec_text(text))
    with torch.no_grad():
        model.federation.messages.lin.weight.mul_(50.0)
    with caplog.at_level("WARNING"):
        model(torch.randn(1, 4, 4))
    assert model.federation.last_iterations == 3 and model.federation.last_residual > 1e-9
    assert "did not converge" in caplog.text


def test_equilibrium_needs_unit_delays(spec_errors):
    text = LOOP.replace("STEPS", "8").replace("MODE", "equilibrium").replace("delay: 1", "delay: 2")
    assert "`mode: equilibrium` solves for one state, so every delay must be 1" in spec_errors(text)


@pytest.mark.parametrize("mode", ["unroll", "equilibrium"])
def test_a_diverging_loop_stops_naming_the_node_and_step(mode):
    from runtime.federation.executor import NonFiniteError

    model = compiler.build_model(
        compiler.load_spec_text(LOOP.replace("STEPS", "4").replace("MODE", mode))
    )
    with torch.no_grad():
        model.federation.messages.lin.weight.fill_(float("inf"))
    what = "feedback step 1 of 4" if mode == "unroll" else "equilibrium iteration 1 of 4"
    with pytest.raises(NonFiniteError, match=f"{what}: node `a` produced NaN or Inf"):
        model(torch.randn(1, 4, 4))


def test_equilibrium_in_training_draws_one_set_of_dropout_masks_per_forward():
    """Fresh masks at every iteration would make f a new map each time and stall the solve."""
    text = LOOP.replace("STEPS", "60").replace("MODE", "equilibrium, tolerance: 1.0e-6")
    text = text.replace("layers: 1}", "layers: 1, dropout: 0.2}")
    model = compiler.build_model(compiler.load_spec_text(text)).train()
    with torch.no_grad():
        model.inputs["t"].proj.weight.normal_(std=1.0)
        model.federation.messages.lin.weight.mul_(0.05)
    x = torch.randn(2, 8, 4)
    torch.manual_seed(0)
    first = model(x)["y"]
    assert model.federation.last_residual < 1e-6
    first.square().sum().backward()
    implicit = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(0)
    assert torch.equal(model(x)["y"], first)  # the masks come from the global generator
    assert not torch.equal(model(x)["y"], first)  # and every forward draws new ones

    model.zero_grad()  # the reference: unroll the same masked map, with its tape
    torch.manual_seed(0)
    federation = model.federation
    federation._mask_seed = int(torch.randint(2**62, ()))
    inputs = model._embed((x,), {})
    _, z = federation._step(inputs, [])
    for _ in range(60):
        states, z = federation._map(inputs, z, None)
    federation._mask_seed = None
    model.read_outputs(states)["y"].square().sum().backward()
    for (name, p), expected in zip(model.named_parameters(), implicit, strict=True):
        torch.testing.assert_close(expected, p.grad, atol=1e-4, rtol=1e-3, msg=name)
