"""Modules keyed by the names a spec gives its inputs, outputs, companions and perspectives.

`nn.ModuleDict` stores an entry as a submodule of that name, and so refuses any name that is
already an attribute of a module (`to`, `forward`, `training`, `state_dict`, `keys`, `type`, ...).
A spec may use any of those as a name; tools that walk a model by path (`torch.export`,
`torch.func.functional_call`) also need `getattr(container, name)` to be the entry. So
`NamedModules` stores an entry whose name a module already uses under that name with a `@` in
front (`@to`), a character no spec name holds, and every other entry under its own name. The
state-dict keys of every name that worked before stay as they were (`inputs.tokens.table.weight`),
so existing checkpoints and GPT-2 imports load unchanged; only a name that could not be used
before reads `outputs.@state_dict.weight`. A sub-graph's names are paths (`g.phase`), and a module
name holds no dot: such an entry is kept as `g:phase` (`outputs.g:phase.weight`). Entries are read by name: `d["to"]`, `d.items()`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

MARK = "@"


# Every attribute an empty container has, methods and instance fields alike (a constant, so
# torch.compile traces `stored_name` as plain set membership).
MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


PATH = ":"  # stands for the dot of a sub-graph's path (`g.phase`): a module name has no dots


def stored_name(name: str) -> str:
    """The submodule name (and state-dict path part) an entry called `name` is kept under."""
    name = name.replace(".", PATH)
    return MARK + name if name in MODULE_ATTRIBUTES else name


def _spec_name(stored: str) -> str:
    stored = stored[len(MARK) :] if stored.startswith(MARK) else stored
    return stored.replace(PATH, ".")


class NamedModules(nn.ModuleDict):
    """A `ModuleDict` keyed by spec names, any of which may be a module attribute's name."""

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[stored_name(name)]

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self.add_module(stored_name(name), module)

    def __delitem__(self, name: str) -> None:
        del self._modules[stored_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and stored_name(name) in self._modules

    def __iter__(self) -> Iterator[str]:
        return (_spec_name(stored) for stored in self._modules)

    def keys(self) -> list[str]:  # type: ignore[override]
        return [_spec_name(stored) for stored in self._modules]

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(_spec_name(stored), module) for stored, module in self._modules.items()]

    def values(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self._modules.values())
