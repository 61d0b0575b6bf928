"""A time axis must be the only clock: what it can and cannot be combined with.

With `time:`, each time step is one step of the graph on that step's inputs, and delayed edges
carry the state across steps. `feedback:` would add a second clock (iterations within a step)
that the runtime does not run with a time axis, and kinds that cannot step through time (their
capabilities say so: a fractal trains its levels on whole sequences, a companion observes one
forward) are refused where they are written, as is a time axis that carries no state."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import KINDS
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_time(ir: IR) -> list[Diagnostic]:
    spec, found = ir.spec, []
    if spec.time is None:
        return found
    if spec.feedback is not None:
        found.append(
            ir.error(
                ("feedback",),
                "`feedback:` iterates the graph within one step, and this spec has a time axis "
                "(`time:`), whose steps are the iterations: the two clocks are not run together",
                "remove `feedback:`; a delayed edge then reads the state of earlier time steps",
                key=True,
            )
        )
    for name, node in spec.nodes.items():
        if not KINDS.get(node.kind).capabilities.time_steps:
            found.append(
                ir.error(
                    ("nodes", name, "kind"),
                    f"`{name}` is a `{node.kind}` node, which cannot step through a time axis",
                    "remove `time:`, or use a kind that can (`epicycle kinds` lists capabilities)",
                )
            )
    if not any(edge.delay for edge in spec.edges):
        found.append(
            ir.warning(
                ("time",),
                "a time axis without delayed edges carries no state: every time step is computed "
                "alone, as a batch of independent steps would be",
                "give an edge `delay: 1` to carry a node's state to the next time step",
            )
        )
    return found
