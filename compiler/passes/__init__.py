"""The middle end: small functions from IR to IR (transforms) or to diagnostics (checks).

The driver in `compiler.pipeline` runs them in this order; each can be called and tested alone.
"""

from compiler.passes.check_companions import check_companions
from compiler.passes.check_cycles import check_cycles
from compiler.passes.check_feedback import check_feedback
from compiler.passes.check_fractals import check_fractals
from compiler.passes.check_reachability import check_reachability
from compiler.passes.check_references import check_references
from compiler.passes.check_shapes import check_shapes
from compiler.passes.check_training import check_training
from compiler.passes.estimate import estimate
from compiler.passes.gear_trains import check_gear_trains, derive_gear_ratios
from compiler.passes.infer_widths import infer_widths
from compiler.passes.plan import plan
from compiler.passes.resolve_defaults import resolve_defaults
from compiler.passes.sample_variations import sample_variations

TRANSFORMS_BEFORE_CHECKS = (resolve_defaults, infer_widths)
CHECKS = (
    check_references,
    check_shapes,
    check_fractals,
    check_gear_trains,
    check_cycles,
    check_companions,
    check_feedback,
    check_reachability,
    check_training,
)
TRANSFORMS_AFTER_CHECKS = (derive_gear_ratios, sample_variations, plan, estimate)

__all__ = [
    "CHECKS",
    "TRANSFORMS_AFTER_CHECKS",
    "TRANSFORMS_BEFORE_CHECKS",
    "check_companions",
    "check_cycles",
    "check_feedback",
    "check_fractals",
    "check_gear_trains",
    "check_reachability",
    "check_references",
    "check_shapes",
    "check_training",
    "derive_gear_ratios",
    "estimate",
    "infer_widths",
    "plan",
    "resolve_defaults",
    "sample_variations",
]
