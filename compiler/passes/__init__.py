"""The middle end: small functions from IR to IR (transforms) or to diagnostics (checks).

The driver in `compiler.pipeline` runs them in this order; each can be called and tested alone.
Kind-specific rules are not here: each node kind brings its own (`compiler.kinds`), and
`check_kinds` / `apply_kind_transforms` run them.
"""

from compiler.passes.check_capabilities import check_capabilities
from compiler.passes.check_cycles import check_cycles
from compiler.passes.check_feedback import check_feedback
from compiler.passes.check_kinds import apply_kind_transforms, check_kinds
from compiler.passes.check_reachability import check_reachability
from compiler.passes.check_references import check_references
from compiler.passes.check_shapes import check_shapes
from compiler.passes.check_time import check_time
from compiler.passes.check_training import check_training
from compiler.passes.estimate import estimate
from compiler.passes.infer_widths import infer_widths
from compiler.passes.plan import plan
from compiler.passes.resolve_defaults import resolve_defaults
from compiler.passes.sample_variations import sample_variations

TRANSFORMS_BEFORE_CHECKS = (resolve_defaults, infer_widths)
CHECKS = (
    check_references,
    check_shapes,
    check_kinds,
    check_capabilities,
    check_cycles,
    check_feedback,
    check_time,
    check_reachability,
    check_training,
)
TRANSFORMS_AFTER_CHECKS = (apply_kind_transforms, sample_variations, plan, estimate)

__all__ = [
    "CHECKS",
    "TRANSFORMS_AFTER_CHECKS",
    "TRANSFORMS_BEFORE_CHECKS",
    "apply_kind_transforms",
    "check_capabilities",
    "check_cycles",
    "check_feedback",
    "check_kinds",
    "check_reachability",
    "check_references",
    "check_shapes",
    "check_time",
    "check_training",
    "estimate",
    "infer_widths",
    "plan",
    "resolve_defaults",
    "sample_variations",
]
