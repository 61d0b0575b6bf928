"""Interop with the rest of the PyTorch world, one module per job:

* `hub`: Hub-style directories. `save_pretrained(model, dir)` / `from_pretrained(dir)` through
  huggingface_hub's `ModelHubMixin` over the project's checkpoint format; `HubGraphModel`,
  `hub_model`.
* `export`: `export_program` / `save_program` (`torch.export`, `.pt2`), `export_onnx` (PyTorch's
  dynamo ONNX exporter) and `check_onnx` (onnxruntime against PyTorch); `example_inputs`.
* `gpt2`: `load_gpt2_weights(model, state_dict)` copies a Hugging Face GPT-2 state dict into a
  transformer node; `gpt2_spec_text(config)` writes the spec of a `GPT2Config`; `from_gpt2` does
  both.

The public names are re-exported here (`from compiler.tools import interop; interop.export_onnx`).
huggingface_hub, onnx/onnxscript, onnxruntime and transformers are optional and imported only by
the functions that need them, never by `epicycle validate` or `compile`.
"""

from __future__ import annotations

from typing import Any

from compiler.tools.interop.export import (
    check_onnx,
    example_inputs,
    export_onnx,
    export_program,
    save_program,
)
from compiler.tools.interop.gpt2 import from_gpt2, gpt2_spec_text, load_gpt2_weights
from compiler.tools.interop.hub import from_pretrained, hub_model, save_pretrained

# HubGraphModel is left out so that `import *` does not import huggingface_hub
__all__ = [
    "check_onnx",
    "example_inputs",
    "export_onnx",
    "export_program",
    "from_gpt2",
    "from_pretrained",
    "gpt2_spec_text",
    "hub_model",
    "load_gpt2_weights",
    "save_pretrained",
    "save_program",
]


def __getattr__(name: str) -> Any:
    # `interop.HubGraphModel` builds the class (and imports the Hub) lazily, as in `hub`.
    if name == "HubGraphModel":
        from compiler.tools.interop.hub import _hub_class

        return _hub_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
