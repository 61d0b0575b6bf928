"""Delays and the feedback schedule must make sense together."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


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
        elif edge.delay and feedback is None and not ir.withheld.covers(("feedback",)):
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
    if feedback.tolerance is not None and feedback.mode != "equilibrium":
        found.append(
            ir.error(
                ("feedback", "tolerance"),
                "`tolerance` applies only to `mode: equilibrium`",
                "add `mode: equilibrium`, or remove `tolerance`",
                key=True,
            )
        )
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
