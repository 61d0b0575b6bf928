"""The driver: spec file -> LoadedSpec -> IR -> passes -> nn.Module.

torch is imported only once a spec has passed every check (planning and the meta-device estimate
need it), so a wrong spec is reported in a fraction of a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.ir import IR, build_ir
from compiler.language.diagnostics import Diagnostic, SpecError, raise_if_errors
from compiler.language.frontend import InvalidDocument, LoadedSpec, load_spec
from compiler.passes import CHECKS, TRANSFORMS_AFTER_CHECKS, TRANSFORMS_BEFORE_CHECKS
from compiler.passes.contract import check_order, verify

# the pipeline's order is checked once, when the driver is imported
check_order((*TRANSFORMS_BEFORE_CHECKS, *CHECKS, *TRANSFORMS_AFTER_CHECKS))

if TYPE_CHECKING:
    import torch

    from compiler.language.overrides import Override
    from runtime.model import GraphModel


def analyze(source: str | Path | LoadedSpec, *, overrides: Sequence[str | Override] = ()) -> IR:
    """Load, validate, check, plan and estimate a spec without allocating any weight.

    `overrides` (`"nodes.sun.width=64"`, see `compiler.language.overrides`) set fields of the
    file's document before validation. Raises `SpecError` with every located problem: those of
    the document, and those the checks find in the part of it that validated; warnings are kept
    in `ir.facts.warnings`.
    """
    if isinstance(source, LoadedSpec) and overrides:
        raise TypeError("overrides apply to a spec file or text, not to a LoadedSpec")
    try:
        loaded = source if isinstance(source, LoadedSpec) else load_spec(source, overrides)
    except InvalidDocument as invalid:
        if invalid.salvaged is None:
            raise
        _, found = _checked(build_ir(invalid.salvaged))
        # only errors: a warning about the salvaged part may be about what was cut away (a time
        # axis "without delayed edges" whose one delayed edge was the invalid one)
        errors = [d for d in found if d.severity == "error"]
        raise SpecError(dict.fromkeys([*invalid.diagnostics, *errors])) from None
    ir, found = _checked(build_ir(loaded))
    warnings = raise_if_errors(found)
    for transform in TRANSFORMS_AFTER_CHECKS:
        ir = transform(ir)
        verify(ir, transform)
    return ir.with_facts(warnings=warnings)


def _checked(ir: IR) -> tuple[IR, list[Diagnostic]]:
    """The IR through the transforms the checks need, and everything the checks found."""
    for transform in TRANSFORMS_BEFORE_CHECKS:
        ir = transform(ir)
        verify(ir, transform)
    return ir, _one_per_root(dict.fromkeys(d for check in CHECKS for d in check(ir)))


_NODE = re.compile(r"node `([^`]+)`")


def _one_per_root(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """One message for one mistake: findings at the same place that differ only in the node they
    name (`heads: 5` in `defaults.transformer`, which divides no node's width) become one,
    naming the other nodes."""
    groups: dict[tuple, list[tuple[Diagnostic, str]]] = {}
    for d in diagnostics:
        names = _NODE.findall(d.message)
        shape = _NODE.sub("node `*`", d.message) if len(names) == 1 else d.message
        groups.setdefault((d.span, shape, d.hint, d.severity), []).append(
            (d, names[0] if len(names) == 1 else "")
        )
    merged = []
    for (_, shape, _, _), members in groups.items():
        first, _ = members[0]
        others = [name for _, name in members[1:]]
        if others and "node `*`" in shape:
            listed = ", ".join(f"`{n}`" for n in others)
            first = replace(
                first, message=f"{first.message} (likewise for {listed}, set by the same line)"
            )
        merged.append(first)
    return merged


def build_model(
    source: str | Path | LoadedSpec | IR,
    *,
    device: str | torch.device | None = None,
    budget: int | None = None,
    overrides: Sequence[str | Override] = (),
) -> GraphModel:
    """The one-call API: a spec file in, an initialised `nn.Module` out (with `.spec` attached).

    Before allocating, the weights' size is checked against `budget` bytes (default: the free
    memory of `device`); `budget=0` turns the guard off. See `compiler.resources`. `overrides`
    are those of `analyze`.
    """
    import torch

    from compiler.lower import lower
    from compiler.resources import check_resources

    if isinstance(source, IR) and overrides:
        raise TypeError("overrides apply to a spec file or text, not to an analysed IR")
    ir = source if isinstance(source, IR) else analyze(source, overrides=overrides)
    if budget != 0:
        check_resources(ir, device=str(device) if device is not None else None, budget=budget)
    with torch.device(device) if device is not None else nullcontext():
        return lower(ir)
