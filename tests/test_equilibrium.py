"""`mode: equilibrium` solvers, gradients, regularisation and statistics, on compiled models.

    feedback:
      mode: equilibrium
      steps: 30                      # the most solver iterations in training
      eval_iterations: 60            # ... and outside it
      solver: anderson               # fixed_point | anderson | broyden
      history: 5                     # Anderson's and Broyden's memory
      tolerance: 1.0e-4              # stop: relative (default) or absolute
      backward: {solver: broyden, tolerance: 1.0e-6}   # the implicit backward's own solve
      grad: phantom                  # instead of implicit: unrolled damped steps from z*
      phantom: {steps: 5, damping: 0.8}
      correction: {states: 3, decay: 0.8}              # supervise states along the solve
      jacobian: {weight: 1.0, every: 1}                # ||df/dz||_F^2 at z* as a training term
      spectral_radius: {every: 1, iterations: 10}      # rho(df/dz) at z*, reported

The model is the two-gear loop of test_gears made contractive (a strong input, a weak feedback
message), so each setting can be checked against a known answer.
"""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.passes.check_capabilities import require
from runtime.federation.equilibrium import EquilibriumPlan, EquilibriumSolver, correction_picks
from runtime.federation.solvers import SolverSettings
from tests.test_gears import LOOP

X = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1))


def loop(settings: str, steps: int = 40, feedback_scale: float = 0.1):
    """The loop under `mode: equilibrium` with extra `feedback:` settings (YAML flow text)."""
    mode = "equilibrium" + (", " + settings if settings else "")
    model = compiler.build_model(
        compiler.load_spec_text(LOOP.replace("STEPS", str(steps)).replace("MODE", mode))
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.inputs["t"].proj.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        model.federation.messages.lin.weight.mul_(feedback_scale)
    return model


def same_weights(*models):
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return models


def gradients(model, x=X) -> list[torch.Tensor]:
    model.zero_grad()
    model(x)["y"].square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_anderson_and_broyden_find_the_fixed_point_that_fixed_point_iteration_finds(solver):
    """At feedback scale 0.3 the loop contracts slowly (about 0.8 per fixed-point step)."""
    plain, accelerated = same_weights(
        loop("tolerance: 1.0e-6", steps=100, feedback_scale=0.3),
        loop(f"solver: {solver}, tolerance: 1.0e-6", steps=100, feedback_scale=0.3),
    )
    plain.eval(), accelerated.eval()
    with torch.no_grad():
        torch.testing.assert_close(accelerated(X)["y"], plain(X)["y"], atol=1e-5, rtol=1e-4)
    for model in (plain, accelerated):
        assert model.federation.last_residual < 1e-6
    # measured: fixed point 69 iterations, Anderson 16, Broyden 19
    assert accelerated.federation.last_iterations < plain.federation.last_iterations / 2


def test_a_batch_is_solved_as_each_sequence_alone():
    model = loop("solver: anderson, tolerance: 1.0e-6").eval()
    with torch.no_grad():
        together = model(X)["y"]
        for i in range(X.shape[0]):
            torch.testing.assert_close(together[i : i + 1], model(X[i : i + 1])["y"])


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_the_implicit_gradient_equals_backpropagating_through_a_long_unroll(solver):
    model = loop(f"solver: {solver}, tolerance: 1.0e-7, backward: {{tolerance: 1.0e-7}}")
    implicit = gradients(model)
    assert model.federation.last_backward_residual < 1e-7
    model.zero_grad()  # the reference: 30 iterations of z <- f(z) with a tape (rate ~0.15)
    inputs, federation = model._embed((X,), {}), model.federation
    _, z = federation._step(inputs, [])
    for _ in range(30):
        states, z = federation._map(inputs, z, None)
    model.read_outputs(states)["y"].square().sum().backward()
    for (name, p), expected in zip(model.named_parameters(), implicit, strict=True):
        torch.testing.assert_close(expected, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_backward_solver_and_tolerance_are_its_own():
    model = loop("tolerance: 1.0e-2, backward: {solver: anderson, tolerance: 1.0e-7}")
    gradients(model)
    report = model.report()["feedback"]
    assert report["solver"] == "fixed_point" and report["backward_solver"] == "anderson"
    assert 1e-3 < report["residual"] < 1e-2 and report["backward_residual"] < 1e-7


def test_phantom_gradients_approach_the_implicit_gradient_as_their_steps_grow():
    """The phantom gradient's error is that of truncating the Neumann series of (I - J)^-1 after
    k terms: it falls like rho^k, rho the spectral radius of J at z* (about 0.15 here)."""
    implicit = torch.cat([g.flatten() for g in gradients(loop("tolerance: 1.0e-7"))])
    errors = []
    for steps in (1, 4, 12):
        model = loop(f"tolerance: 1.0e-7, grad: phantom, phantom: {{steps: {steps}}}")
        phantom = torch.cat([g.flatten() for g in gradients(model)])
        errors.append(float((phantom - implicit).norm() / implicit.norm()))
    assert errors[0] > errors[1] > errors[2]
    # 0.15^12 ~ 1e-10: at 12 steps what is left is float32 rounding and the solves' tolerance
    assert errors[2] < 1e-4
    assert model.report()["feedback"]["backward_iterations"] is None  # nothing was solved


def test_damped_phantom_steps_still_point_the_same_way():
    implicit = torch.cat([g.flatten() for g in gradients(loop("tolerance: 1.0e-7"))])
    damped = loop("tolerance: 1.0e-7, grad: phantom, phantom: {steps: 10, damping: 0.7}")
    phantom = torch.cat([g.flatten() for g in gradients(damped)])
    # damping 0.7 makes each step's Jacobian 0.3 I + 0.7 J (rate ~0.4): 10 steps reach ~1e-4
    assert torch.nn.functional.cosine_similarity(phantom, implicit, dim=0) > 0.999


def test_more_iterations_are_allowed_in_evaluation_than_in_training():
    model = loop("tolerance: 1.0e-12, eval_iterations: 10", steps=3)
    model(X)
    assert model.federation.last_iterations == 3  # training stops at `steps`
    model.eval()
    with torch.no_grad():
        model(X)
    assert model.federation.last_iterations == 10  # 1e-12 is out of float32's reach


def test_the_report_holds_each_solve_s_residual_trace_and_estimates():
    model = loop("solver: anderson, spectral_radius: {iterations: 20}, jacobian: {weight: 0.5}")
    model(X[:1])["y"].square().sum().backward()  # one sequence: its Jacobian is 256 x 256
    report = model.report()["feedback"]
    assert report["mode"] == "equilibrium" and report["solver"] == "anderson"
    assert len(report["residuals"]) == report["iterations"]
    assert report["residuals"][-1] == report["residual"] < 1e-4
    assert len(report["backward_residuals"]) == report["backward_iterations"]
    exact = torch.linalg.eigvals(loop_jacobian(model)).abs().max().item()
    assert report["spectral_radius"] == pytest.approx(exact, rel=0.15)
    assert report["jacobian"] > 0
    assert all(isinstance(v, (int, float, str, list, type(None))) for v in report.values())


def loop_jacobian(model) -> torch.Tensor:
    """The exact Jacobian of the loop's map at its fixed point for X (a small matrix here)."""
    federation = model.federation
    with torch.no_grad():
        inputs = model._embed((X[:1],), {})
    z = federation.fixed_point(inputs)
    jacobian = torch.autograd.functional.jacobian(
        lambda state: federation._map(inputs, state, None)[1], z
    )
    return jacobian.reshape(z.numel(), z.numel())


def test_the_jacobian_term_reaches_the_loss_on_its_steps():
    model = loop("jacobian: {weight: 2.0, every: 2}")
    for step in range(3):
        model(X)
        term = model.auxiliary_loss(step)
        if step == 1:  # every 2nd training forward has none
            assert float(term) == 0
        else:
            assert term.requires_grad and float(term.detach()) > 0
            estimate = model.report()["feedback"]["jacobian"]
            assert float(term.detach()) == pytest.approx(2.0 * estimate)


def test_the_jacobian_term_lowers_the_loop_s_jacobian_when_trained_on_alone():
    model = loop("jacobian: {weight: 1.0}", feedback_scale=0.3)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    estimates = []
    for step in range(6):
        optimiser.zero_grad()
        model(X)
        model.auxiliary_loss(step).backward()
        estimates.append(model.report()["feedback"]["jacobian"])
        optimiser.step()
    assert estimates[-1] < 0.8 * estimates[0]


def linear_solver(a: torch.Tensor) -> EquilibriumSolver:
    """An `EquilibriumSolver` whose step is z -> A z + 1 on a `(batch, 1, 1, dim)` bus."""

    def step(embedded, history):
        z = history[0] if history else torch.zeros(2, 1, 1, a.shape[0])
        return [], z @ a.T + 1

    return EquilibriumSolver(step, ["n"], EquilibriumPlan())


def test_the_jacobian_estimate_is_unbiased_for_the_frobenius_norm():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) / 3
    solver = linear_solver(a)
    z = torch.zeros(2, 1, 1, 6)
    exact = float(a.square().sum() / 6)  # ||A||_F^2 / dim
    many = float(solver.jacobian_estimate({}, z, None, probes=20_000))
    assert many == pytest.approx(exact, rel=0.03)  # the standard error at 20,000 probes is ~1%
    one = [float(solver.jacobian_estimate({}, z, None)) for _ in range(3)]
    assert len(set(one)) == 1  # outside training the probe is seeded: one value, repeatable


def test_the_spectral_radius_estimate_settles_on_a_complex_pair():
    rotation = 0.9 * torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-0.9i
    a = torch.block_diag(rotation, torch.diag(torch.tensor([0.5, -0.3, 0.1, 0.0])))
    radius = linear_solver(a).spectral_radius_at({}, torch.zeros(2, 1, 1, 6), None, 40)
    assert radius == pytest.approx(0.9, rel=1e-3)


def test_fixed_point_correction_scores_states_along_the_solve():
    model = loop("tolerance: 1.0e-7, correction: {states: 3, decay: 0.5}")
    outputs = model(X)
    with pytest.raises(ValueError, match="pass it as `model.auxiliary_loss"):
        model.auxiliary_loss(0)  # the task loss is needed to score the states

    def task_loss(out):
        return out["y"].square().mean()

    states = model.federation.correction_states()
    assert [weight for weight, _ in states] == [0.125, 0.25, 0.5]
    earliest = task_loss(model.read_outputs(states[0][1]))
    assert not torch.allclose(earliest, task_loss(outputs))  # a state before convergence
    total = model.auxiliary_loss(0, task_loss=task_loss)
    expected = sum(w * task_loss(model.read_outputs(s)) for w, s in states)
    torch.testing.assert_close(total, expected)
    (task_loss(outputs) + total).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        model(X)
    assert model.federation.correction_states() == []  # training only


def test_correction_picks_evenly_spaced_states_ending_next_to_the_fixed_point():
    assert correction_picks(10, 3) == [2, 6, 9]
    assert correction_picks(2, 3) == [0, 1]


def test_an_equilibrium_spec_is_refused_a_fullgraph_compile_with_a_located_message(write_spec):
    path = write_spec(LOOP.replace("STEPS", "8").replace("MODE", "equilibrium, solver: anderson"))
    with pytest.raises(compiler.SpecError) as info:
        require(compiler.analyze(path), "fullgraph", "compile with fullgraph=True", "drop it")
    message = info.value.format()
    assert f"{path}:13:28: error: cannot compile with fullgraph=True" in message  # `mode:`
    assert "the solver runs eagerly" in message


def test_the_refusal_is_honest_a_fullgraph_compile_does_break_at_the_solver():
    torch._dynamo.reset()
    model = loop("solver: anderson").eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"), torch.no_grad():
        compiled(X)
    torch._dynamo.reset()


def test_plans_carry_the_settings_to_the_solver():
    model = loop(
        "solver: broyden, history: 7, stop: absolute, tolerance: 0.5, eval_iterations: 90, "
        "backward: {solver: anderson, mixing: 0.5, steps: 12}"
    )
    settings = model.federation.equilibrium.settings
    assert settings.forward == SolverSettings("broyden", 40, 0.5, "absolute", 7, 1.0)
    assert settings.backward == SolverSettings("anderson", 12, 0.5, "absolute", 7, 0.5)
    assert settings.eval_steps == 90 and settings.grad == "implicit"
