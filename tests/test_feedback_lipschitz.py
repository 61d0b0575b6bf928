"""`feedback.lipschitz`: an equilibrium loop whose Jacobian at the fixed point stays below a bound.

    feedback: {steps: 40, mode: equilibrium, lipschitz: 0.5}

The bound is on the local Lipschitz constant of the feedback map f at its fixed point z*, the
spectral norm of J_f(z*): below 1, the forward solve and the implicit backward both contract near
z*. In training the runtime measures it by power iteration after each solve and, while it exceeds
the bound, scales what the delayed edges read by a stored `feedback_gain` (<= 1) and solves again.
"""

from __future__ import annotations

import logging

import pytest
import torch

import compiler
from compiler.tools.checkpoint import load_checkpoint, save_checkpoint
from tests.test_gears import LOOP


def loop(feedback_scale: float, extra: str = ", lipschitz: 0.5", steps: int = 40):
    """The two-gear loop of test_gears; `feedback_scale` makes its feedback message stronger."""
    mode = "equilibrium, tolerance: 1.0e-6" + extra
    model = compiler.build_model(
        compiler.load_spec_text(LOOP.replace("STEPS", str(steps)).replace("MODE", mode))
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.inputs["t"].proj.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        model.federation.messages.lin.weight.mul_(feedback_scale)
    return model


X = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))


def embedded(model):
    with torch.no_grad():
        return model._embed((X,), {})


def test_the_power_iteration_finds_the_spectral_norm_of_the_exact_jacobian():
    model = loop(5.0, extra="")
    federation, inputs = model.federation, embedded(model)
    z = torch.randn(2, 8, 2, federation.plan.bus_width, generator=torch.Generator().manual_seed(2))
    jacobian = torch.autograd.functional.jacobian(
        lambda state: federation._map(inputs, state, None)[1], z
    ).reshape(z.numel(), z.numel())
    exact = torch.linalg.matrix_norm(jacobian, ord=2).item()
    assert federation.lipschitz_at(inputs, z, iterations=200) == pytest.approx(exact, rel=1e-4)


def test_a_loop_that_diverges_converges_under_the_bound(caplog):
    plain = loop(50.0, extra="")
    with caplog.at_level(logging.WARNING):
        plain(X)["y"].square().sum().backward()
    assert plain.federation.last_residual > 1e-6  # no fixed point found in 40 iterations
    assert "equilibrium feedback did not converge" in caplog.text
    assert "equilibrium backward did not converge" in caplog.text  # the gradient is approximate
    assert plain.feedback_lipschitz(X) > 1

    bounded = loop(50.0)
    bounded.load_state_dict(plain.state_dict(), strict=False)
    for _ in range(2):
        bounded(X)["y"].square().sum().backward()
        federation = bounded.federation
        assert federation.last_residual < 1e-6 and federation.last_iterations < 15
        assert federation.last_backward_residual < 1e-6 and federation.last_backward_iterations < 15
        assert federation.last_lipschitz <= 0.5
    assert 0 < float(federation.feedback_gain) < 0.01
    assert bounded.feedback_lipschitz(X, iterations=200) <= 0.5  # measured afresh, to convergence


def test_a_loop_already_within_the_bound_is_untouched():
    plain, bounded = loop(0.05, extra=""), loop(0.05, extra=", lipschitz: 0.9")
    assert plain.feedback_lipschitz(X) < 0.9
    for model in (plain, bounded):
        torch.manual_seed(3)
        model(X)["y"].square().sum().backward()
    assert float(bounded.federation.feedback_gain) == 1.0
    assert torch.equal(plain(X)["y"], bounded(X)["y"])
    for p, q in zip(plain.parameters(), bounded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_the_implicit_gradient_under_a_gain_equals_unrolling_the_scaled_map():
    model = loop(5.0, extra=", lipschitz: 0.5")
    model(X)  # the first forward sets the gain
    gain = model.federation.feedback_gain.clone()
    assert gain < 0.1
    model.zero_grad()
    model(X)["y"].square().sum().backward()
    assert model.federation.last_lipschitz <= 0.5  # within the bound: this step used `gain`
    implicit = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()  # the reference: backpropagate through 80 iterations of z <- f(gain * z)
    inputs = model._embed((X,), {})
    federation = model.federation
    _, z = federation._step(inputs, [])
    for _ in range(80):
        states, z = federation._map(inputs, z, gain)
    model.read_outputs(states)["y"].square().sum().backward()
    for (name, p), expected in zip(model.named_parameters(), implicit, strict=True):
        torch.testing.assert_close(expected, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_fresh_model_measures_its_loop_on_its_first_forward_in_any_mode():
    model = loop(50.0).eval()
    with torch.no_grad():
        model(X)
    assert bool(model.federation.feedback_gain_measured)
    assert model.federation.last_residual < 1e-6
    gain = model.federation.feedback_gain.clone()
    with torch.no_grad():
        model(2 * X)  # evaluation keeps the measured gain from then on
    assert torch.equal(model.federation.feedback_gain, gain)


def test_the_gain_travels_with_the_checkpoint(tmp_path):
    model = loop(50.0)
    model(X)["y"].sum().backward()
    save_checkpoint(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(again.federation.feedback_gain, model.federation.feedback_gain)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(X)["y"], model(X)["y"])


def test_the_power_iteration_leaves_the_callers_random_stream_alone():
    model = loop(5.0)
    torch.manual_seed(4)
    model(X)
    after = torch.rand(3)
    torch.manual_seed(4)
    loop(5.0, extra="")(X)
    assert torch.equal(torch.rand(3), after)


def test_a_compiled_model_runs_the_equilibrium_eagerly_and_trains():
    torch._dynamo.reset()
    model = loop(5.0)
    model(X)  # measure the loop once, so both runs below use the same gain
    model.eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X)["y"], model(X)["y"])
    model.train()
    compiled(X)["y"].square().sum().backward()
    assert model.federation.last_backward_residual < 1e-6
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_evaluation_whose_solve_fails_is_bounded_for_that_forward_only():
    model = loop(50.0)
    model(X)  # measured on X
    model.eval()
    gain = model.federation.feedback_gain.clone()
    with torch.no_grad():
        model.federation.messages.lin.weight.mul_(20.0)  # now the stored gain is far too large
        model(X)
    assert model.federation.last_residual < 1e-6 and model.federation.last_lipschitz <= 0.5
    assert torch.equal(model.federation.feedback_gain, gain)  # evaluation stores nothing


def test_compile_reports_the_smoke_forwards_solve_and_bound():
    from typer.testing import CliRunner

    from compiler.tools.cli import app
    from tests.conftest import ROOT

    result = CliRunner().invoke(app, ["compile", str(ROOT / "specs" / "equilibrium.yaml")])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split("equilibrium: ")[1].split())  # rich wraps long lines
    assert line.startswith("solved in ") and "of 30 iterations" in line
    sigma = float(line.split("||J|| at the fixed point ")[1].split()[0])
    assert sigma <= 0.8 and "(bound 0.8, gain " in line
