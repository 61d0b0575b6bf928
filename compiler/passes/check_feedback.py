"""Delays and the feedback schedule must make sense together."""

from __future__ import annotations

from typing import Any

from compiler.ir import IR, fed_back_output
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract

# The settings of the equilibrium solve and its gradient: meaningless in the other modes.
EQUILIBRIUM_ONLY = (
    "solver",
    "history",
    "mixing",
    "tolerance",
    "stop",
    "eval_iterations",
    "backward",
    "grad",
    "phantom",
    "correction",
    "jacobian",
    "spectral_radius",
)


@contract(requires=(), provides=())
def check_feedback(ir: IR) -> list[Diagnostic]:
    spec, found = ir.spec, []
    feedback = spec.feedback
    delayed = [(i, e) for i, e in enumerate(spec.edges) if e.delay > 0]
    for i, edge in enumerate(spec.edges):
        label = f"{edge.source} -> {edge.to}"
        if edge.kind == "feedback" and edge.delay == 0:
            found.append(
                ir.error(
                    ("edges", i, "kind"),
                    f"the feedback edge {label} has no delay",
                    "add `delay: 1`: a feedback edge reads the previous step's state",
                )
            )
        elif (
            edge.delay
            and feedback is None
            and spec.time is None  # a time axis: check_time
            and not ir.withheld.covers(("feedback",))
        ):
            found.append(
                ir.error(
                    ("edges", i, "delay"),
                    f"edge {label} has `delay: {edge.delay}` but the spec has no `feedback:` section, "
                    "so there is no earlier step to read",
                    f"add `feedback: {{steps: {edge.delay + 3}}}` to iterate the graph",
                )
            )
        elif edge.delay and feedback is not None and edge.delay >= feedback.steps:
            found.append(
                ir.error(
                    ("edges", i, "delay"),
                    f"edge {label} has `delay: {edge.delay}` but feedback runs only {feedback.steps} steps: "
                    "it would never carry a message",
                    f"raise `feedback.steps` above {edge.delay}, or lower the delay",
                )
            )
    found += check_fed_back_outputs(ir)
    if feedback is None:
        return found
    undelayed_feedback = any(e.kind == "feedback" and e.delay == 0 for e in spec.edges)
    if not delayed and not undelayed_feedback and not ir.withheld.any("edges"):
        # a feedback edge without its delay is reported above; adding it answers this too
        found.append(
            ir.error(
                ("feedback",),
                "`feedback:` iterates the graph, but no edge has a delay, so every step would compute the same thing",
                "give the edge that closes a loop `delay: 1`, or remove `feedback:`",
            )
        )
    if feedback.mode == "truncated" and feedback.backprop_steps is None:
        found.append(
            ir.error(
                ("feedback", "mode"),
                "`mode: truncated` needs `backprop_steps` (how many of the last steps keep gradients)",
                f"add `backprop_steps: {max(1, feedback.steps // 2)}`",
            )
        )
    if feedback.mode == "equilibrium":
        for i, edge in delayed:
            if edge.delay != 1:
                found.append(
                    ir.error(
                        ("edges", i, "delay"),
                        f"`mode: equilibrium` solves for one state, so every delay must be 1; "
                        f"edge {edge.source} -> {edge.to} has `delay: {edge.delay}`",
                        "use `delay: 1`, or `mode: unroll`",
                    )
                )
    if feedback.mode != "equilibrium":
        for field in EQUILIBRIUM_ONLY:
            if getattr(feedback, field) is not None:
                found.append(
                    ir.error(
                        ("feedback", field),
                        f"`{field}` applies only to `mode: equilibrium`; `mode: {feedback.mode}` "
                        "runs a fixed number of steps and has no fixed point to solve for",
                        f"add `mode: equilibrium`, or remove `{field}`",
                        key=True,
                    )
                )
    else:
        found += check_solvers(ir, feedback)
    if feedback.lipschitz is not None and feedback.mode != "equilibrium":
        found.append(
            ir.error(
                ("feedback", "lipschitz"),
                "`lipschitz` bounds the Jacobian of the map whose fixed point `mode: equilibrium` solves for; "
                f"`mode: {feedback.mode}` has no fixed point",
                "add `mode: equilibrium`, or remove `lipschitz`",
                key=True,
            )
        )
    if feedback.power_iterations is not None and feedback.lipschitz is None:
        found.append(
            ir.error(
                ("feedback", "power_iterations"),
                "`power_iterations` applies only with `lipschitz`",
                "add `lipschitz: 0.9`, or remove `power_iterations`",
                key=True,
            )
        )
    if feedback.backprop_steps is not None:
        if feedback.mode != "truncated":
            found.append(
                ir.error(
                    ("feedback", "backprop_steps"),
                    "`backprop_steps` applies only to `mode: truncated`",
                    "add `mode: truncated`, or remove `backprop_steps`",
                    key=True,
                )
            )
        elif feedback.backprop_steps > feedback.steps:
            found.append(
                ir.error(
                    ("feedback", "backprop_steps"),
                    f"`backprop_steps: {feedback.backprop_steps}` is more than the {feedback.steps} steps run",
                    f"use at most {feedback.steps}",
                )
            )
    return found


# outputs computed per token, whose values can be added to a node's token stream
PER_TOKEN_OUTPUTS = ("lm_head", "regression")


def check_fed_back_outputs(ir: IR) -> list[Diagnostic]:
    """An edge `from: outputs.NAME` must be delayed (the output is computed from its own step's
    states: undelayed, it would be a loop through the head), declare its projection, be a plain
    edge into a federation node, and run where each step has a previous one to read."""
    spec, found = ir.spec, []
    feedback = spec.feedback
    for i, edge in enumerate(spec.edges):
        fed = fed_back_output(edge.source)
        label = f"{edge.source} -> {edge.to}"
        if fed is None:
            if edge.projection is not None:
                found.append(
                    ir.error(
                        ("edges", i, "projection"),
                        f"edge {label} starts at a node: `projection` maps an output's values "
                        "to a node's width, and messages between nodes travel on the bus",
                        "remove `projection`, or start the edge at `outputs.NAME`",
                        key=True,
                    )
                )
            continue
        if edge.source in spec.nodes:  # a sub-graph named `outputs` has nodes `outputs.X`
            found.append(
                ir.error(
                    ("edges", i, "from"),
                    f"`{edge.source}` names output `{fed}` fed back, and also node `{edge.source}` "
                    "of the sub-graph `outputs`",
                    "rename the sub-graph: `outputs.NAME` in an edge always means an output",
                )
            )
        if edge.delay == 0 and edge.kind != "feedback":  # a delay-less `feedback` edge: above
            found.append(
                ir.error(
                    ("edges", i, "from"),
                    f"edge {label} starts at an output but has no delay: an output is computed "
                    "from its own step's states, so an undelayed edge from it loops through the head",
                    "add `delay: 1`: the node then reads what the output gave one step before",
                )
            )
        if edge.projection is None:
            found.append(
                ir.error(
                    ("edges", i, "from"),
                    f"edge {label} starts at an output and needs `projection`, the map from the "
                    "output's values to the receiving node's width",
                    "add `projection: linear`",
                )
            )
        if edge.kind not in ("message", "feedback"):
            found.append(
                ir.error(
                    ("edges", i, "kind"),
                    f"edge {label} starts at an output, which has no state on the bus: "
                    f"`kind: {edge.kind}` is for edges between nodes",
                    "remove `kind`, or use `kind: feedback`",
                )
            )
        if edge.ratio is not None:
            found.append(
                ir.error(
                    ("edges", i, "ratio"),
                    f"edge {label} starts at an output: a ratio conditions messages between "
                    "nodes' states, and an output's values go through its projection",
                    "remove `ratio`",
                    key=True,
                )
            )
        output = spec.outputs.get(fed)
        if output is not None and output.kind not in PER_TOKEN_OUTPUTS:
            found.append(
                ir.error(
                    ("edges", i, "from"),
                    f"output `{fed}` is `kind: {output.kind}`, one value per example, and only "
                    f"per-token outputs ({', '.join(PER_TOKEN_OUTPUTS)}) can be added to a "
                    "node's tokens",
                    "feed back a per-token output (a `regression`, an `lm_head`)",
                )
            )
        receiver = ir.graph.nodes.get(f"nodes.{edge.to}")
        if receiver is not None and receiver["role"] == "observer":
            found.append(
                ir.error(
                    ("edges", i, "to"),
                    f"`{edge.to}` is a `kind: {receiver['kind']}` node, which observes its host "
                    "and takes no input",
                    "feed the output back into a node of the federation",
                )
            )
        if feedback is not None and feedback.mode == "equilibrium":
            found.append(
                ir.error(
                    ("edges", i, "from"),
                    f"edge {label} feeds an output back, but `mode: equilibrium` solves for the "
                    "nodes' states alone: the heads are not part of its fixed point",
                    "use `mode: unroll` or `mode: truncated`, or a time axis (`time: {}`)",
                )
            )
    return found


def check_solvers(ir: IR, feedback: Any) -> list[Diagnostic]:
    """Each solver's settings must be ones it has, and the gradient's ones it uses."""
    found = solver_settings(ir, ("feedback",), feedback.solver, feedback)
    relative = feedback.stop != "absolute"
    backward = feedback.backward
    if backward is not None:
        solver = backward.solver or feedback.solver
        found += solver_settings(ir, ("feedback", "backward"), solver, backward)
        if feedback.grad == "phantom":
            found.append(
                ir.error(
                    ("feedback", "backward"),
                    "`backward` configures the implicit backward solve, but `grad: phantom` "
                    "unrolls a few steps instead and solves nothing",
                    "remove `backward`, or use `grad: implicit`",
                    key=True,
                )
            )
    for path, tolerance in (
        (("feedback", "tolerance"), feedback.tolerance),
        (("feedback", "backward", "tolerance"), backward and backward.tolerance),
    ):
        if relative and tolerance is not None and tolerance >= 1:
            found.append(
                ir.error(
                    path,
                    f"a relative residual ||f(z) - z|| / ||f(z)|| below {tolerance:g} is met by "
                    "almost any state: the tolerance must be below 1",
                    "use a tolerance such as 1e-4, or `stop: absolute`",
                )
            )
    if feedback.phantom is not None and feedback.grad != "phantom":
        found.append(
            ir.error(
                ("feedback", "phantom"),
                "`phantom` sets the steps of phantom gradients, but the gradient is "
                f"`{feedback.grad or 'implicit'}`",
                "add `grad: phantom`, or remove `phantom`",
                key=True,
            )
        )
    return found


def solver_settings(ir: IR, where: tuple, solver: str | None, settings: Any) -> list[Diagnostic]:
    """`history` is Anderson's and Broyden's memory; `mixing` damps fixed point and Anderson."""
    solver, found = solver or "fixed_point", []
    if settings.history is not None and solver == "fixed_point":
        found.append(
            ir.error(
                (*where, "history"),
                "`history` is the memory of `solver: anderson` or `broyden`; fixed-point "
                "iteration keeps no past iterates",
                "add `solver: anderson`, or remove `history`",
                key=True,
            )
        )
    if settings.mixing is not None and solver == "broyden":
        found.append(
            ir.error(
                (*where, "mixing"),
                "`mixing` damps `fixed_point` and `anderson` steps; Broyden takes full "
                "quasi-Newton steps",
                "remove `mixing`, or use `solver: anderson`",
                key=True,
            )
        )
    return found
