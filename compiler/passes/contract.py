"""What each pass requires of the IR and what it provides, declared and checked by the driver.

A pass carries a `Contract` (`@contract(requires=..., provides=...)`) naming IR records:
`nodes.ATTR` (every sub-model vertex has `ATTR`), likewise `inputs.`, `outputs.` and
`companions.`, and `facts.KEY` (a whole-model result). `check_order` refuses a pipeline whose
passes would read what no earlier pass wrote (so a reordering is an error at import, not a gear
quietly turning at ratio 1), and `verify` confirms after a transform that it wrote what it said.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from compiler.ir import Facts

FACTS = {f.name for f in dataclasses.fields(Facts)}
ROLES = {"nodes": "node", "inputs": "input", "outputs": "output", "observers": "observer"}

# What `compiler.ir.build_ir` gives every vertex and the IR itself
BUILT = frozenset(f"{group}.{attr}" for group in ROLES for attr in ("name", "kind", "spec", "path"))


@dataclass(frozen=True)
class Contract:
    requires: frozenset[str]
    provides: frozenset[str]


class PassOrderError(RuntimeError):
    pass


def contract(
    *, requires: Iterable[str] = (), provides: Iterable[str] = ()
) -> Callable[[Callable], Callable]:
    declared = Contract(frozenset(requires), frozenset(provides))
    for name in declared.requires | declared.provides:
        group, _, attr = name.partition(".")
        if group not in (*ROLES, "facts") or (group == "facts" and attr not in FACTS):
            raise PassOrderError(f"`{name}` names no IR record")

    def mark(function: Callable) -> Callable:
        function.contract = declared
        return function

    return mark


def contract_of(function: Callable) -> Contract:
    found = getattr(function, "contract", None)
    if found is None:
        raise PassOrderError(f"pass `{function.__name__}` declares no contract")
    return found


def check_order(passes: Iterable[Callable], available: Iterable[str] = BUILT) -> None:
    """Raise `PassOrderError` naming the first pass that needs what no earlier one provides."""
    have = set(available)
    for function in passes:
        declared = contract_of(function)
        missing = sorted(declared.requires - have)
        if missing:
            raise PassOrderError(
                f"pass `{function.__name__}` requires {', '.join(missing)}, which no earlier pass "
                "provides; move it after the pass that does"
            )
        have |= declared.provides


def verify(ir: Any, function: Callable) -> None:
    """Raise `PassOrderError` if `function` did not write a record it declares."""
    for name in contract_of(function).provides:
        group, _, attr = name.partition(".")
        if group == "facts":
            ok = getattr(ir.facts, attr, None) is not None
        else:
            ok = all(attr in data for _, data in ir.vertices(ROLES[group]))
        if not ok:
            raise PassOrderError(f"pass `{function.__name__}` did not provide {name}")
