"""Capabilities: what a node kind, a component or a perspective can take part in.

Every part declares them; `compiler.passes.check_capabilities` refuses at validate time any spec
that asks a part for what it lacks, and the tools (`export`, `train --strategy fsdp`, `--compile`)
ask `model_capabilities` before they start instead of failing minutes later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What a node kind (or a component) can take part in. The capability check refuses, at
    validate time and with a located error, any spec that asks a part for what it lacks."""

    receives_messages: bool = True  # the end of a message, mesh, cross or feedback edge
    sends_messages: bool = True  # the start of one
    feedback: bool = True  # on a cycle through delayed edges, iterated by `feedback:`
    in_fractal: bool = False  # usable inside a fractal's base (components)
    batched: bool = True  # same-shaped peers run as one call over stacked weights
    time_steps: bool = True  # steps through a spec's time axis (`time:`), state carried
    onnx: bool = True  # `epicycle export -o model.onnx`
    export: bool = True  # `torch.export` (`epicycle export -o model.pt2`)
    fullgraph: bool = True  # `torch.compile(fullgraph=True)` captures it in one graph
    fsdp: bool = True  # `epicycle train --strategy fsdp`
    cuda_graphs: bool = True  # its step has static shapes and no host synchronisation

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def supported(self) -> list[str]:
        return [name for name in self.names() if getattr(self, name)]


CAPABILITY_HELP = {
    "receives_messages": "receive messages along edges",
    "sends_messages": "send messages along edges",
    "feedback": "take part in a feedback loop",
    "in_fractal": "live inside a fractal",
    "batched": "batch with same-shaped peers",
    "time_steps": "step through a time axis",
    "onnx": "export to ONNX",
    "export": "export with torch.export",
    "fullgraph": "compile with torch.compile(fullgraph=True)",
    "fsdp": "train under FSDP",
    "cuda_graphs": "run under CUDA graphs",
}
