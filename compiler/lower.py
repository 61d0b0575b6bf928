"""Back end: builders that turn the planned IR into runtime modules (nodes through their kinds' `build` hooks).

Each builder takes the resolved vertex data and returns a module from `runtime/`, which knows
nothing of YAML. Weights are drawn from a generator seeded by the spec's `seed`, inside a forked
RNG so compiling a model never disturbs the caller's random state; the same spec and seed give
bit-identical weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compiler.ir import IR
from compiler.language.kinds import KINDS
from runtime.federation.executor import Federation
from runtime.model import CompanionWiring, GraphModel, OutputWiring
from runtime.ports import FeatureInput, LinearHead, PooledHead, TokenInput

InputBuilder = Callable[[Any, int], nn.Module]
OutputBuilder = Callable[[Any, int, dict[str, nn.Module]], nn.Module]

INPUT_BUILDERS: dict[str, InputBuilder] = {
    "tokens": lambda spec, width: TokenInput(spec.vocab, width, spec.context),
    "features": lambda spec, width: FeatureInput(spec.width, width, spec.context),
}


def _lm_head(spec: Any, width: int, inputs: dict[str, nn.Module]) -> nn.Module:
    vocab_of = spec.vocab_of or next(n for n, m in inputs.items() if isinstance(m, TokenInput))
    table = inputs[vocab_of]
    return LinearHead(width, table.vocab, tie_to=table.table if spec.tie else None)


OUTPUT_BUILDERS: dict[str, OutputBuilder] = {
    "lm_head": _lm_head,
    "regression": lambda spec, width, inputs: LinearHead(width, spec.width, bias=True),
    "classification": lambda spec, width, inputs: PooledHead(width, spec.classes, spec.pool),
}


def build_group(group: Any) -> nn.Module:
    """A batch group's module, from its node kind's `build` hook."""
    return KINDS.get(group.kind).build(group)


def lower(ir: IR, make_group: Callable[[Any], nn.Module] = build_group) -> GraphModel:
    """Build the module (on the current default device: use `torch.device("meta")` to count only)."""
    spec = ir.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        inputs = {
            name: INPUT_BUILDERS[data["kind"]](data["spec"], data["width"])
            for _, data in ir.vertices("input")
            for name in [data["name"]]
        }
        federation = Federation(ir.facts.federation, make_group)
        outputs, wiring = {}, {}
        address = ir.facts.address
        for _, data in ir.vertices("output"):
            name = data["name"]
            outputs[name] = OUTPUT_BUILDERS[data["kind"]](data["spec"], data["width"], inputs)
            wiring[name] = OutputWiring(tuple(address[source] for source in data["spec"].source))
        companions = {
            name: KINDS.get(ir.spec.nodes[name].kind).build(config)
            for name, (_, config) in ir.facts.companions.items()
        }
        observed = {
            name: CompanionWiring(
                host, bool(ir.spec.nodes[name].detach), float(ir.spec.nodes[name].weight)
            )
            for name, (host, _) in ir.facts.companions.items()
        }
    kinds = {name: node.kind for name, node in spec.nodes.items()}
    model = GraphModel(inputs, federation, outputs, wiring, companions, observed, kinds)
    model.spec = spec
    model.spec_text = ir.loaded.text
    model.spec_digest = ir.loaded.digest
    return model
