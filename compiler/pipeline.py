"""The driver: spec file -> LoadedSpec -> IR -> passes -> nn.Module.

torch is imported only once a spec has passed every check (planning and the meta-device estimate
need it), so a wrong spec is reported in a fraction of a second.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.ir import IR, build_ir
from compiler.language.diagnostics import raise_if_errors
from compiler.language.frontend import LoadedSpec, load_spec
from compiler.passes import CHECKS, TRANSFORMS_AFTER_CHECKS, TRANSFORMS_BEFORE_CHECKS
from compiler.passes.contract import check_order, verify

# the pipeline's order is checked once, when the driver is imported
check_order((*TRANSFORMS_BEFORE_CHECKS, *CHECKS, *TRANSFORMS_AFTER_CHECKS))

if TYPE_CHECKING:
    import torch

    from runtime.model import GraphModel


def analyze(source: str | Path | LoadedSpec) -> IR:
    """Load, validate, check, plan and estimate a spec without allocating any weight.

    Raises `SpecError` with every located problem; warnings are kept in `ir.facts.warnings`.
    """
    loaded = source if isinstance(source, LoadedSpec) else load_spec(source)
    ir = build_ir(loaded)
    for transform in TRANSFORMS_BEFORE_CHECKS:
        ir = transform(ir)
        verify(ir, transform)
    warnings = raise_if_errors(d for check in CHECKS for d in check(ir))
    for transform in TRANSFORMS_AFTER_CHECKS:
        ir = transform(ir)
        verify(ir, transform)
    return ir.with_facts(warnings=warnings)


def build_model(
    source: str | Path | LoadedSpec | IR,
    *,
    device: str | torch.device | None = None,
    budget: int | None = None,
) -> GraphModel:
    """The one-call API: a spec file in, an initialised `nn.Module` out (with `.spec` attached).

    Before allocating, the weights' size is checked against `budget` bytes (default: the free
    memory of `device`); `budget=0` turns the guard off. See `compiler.resources`.
    """
    import torch

    from compiler.lower import lower
    from compiler.resources import check_resources

    ir = source if isinstance(source, IR) else analyze(source)
    if budget != 0:
        check_resources(ir, device=str(device) if device is not None else None, budget=budget)
    with torch.device(device) if device is not None else nullcontext():
        return lower(ir)
