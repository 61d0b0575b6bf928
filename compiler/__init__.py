"""epicycle's compiler: YAML spec -> pydantic `Spec` -> graph IR -> passes -> `nn.Module`.

import compiler
model = compiler.build_model("specs/transformer.yaml")
logits = model(tokens)["logits"]
"""

from .diagnostics import Diagnostic, Span, SpecError
from .frontend import LoadedSpec, load_spec, load_spec_text
from .ir import IR, build_ir
from .pipeline import analyze, build_model
from .registry import REGISTRY, ComponentConfig, register
from .spec import Spec, json_schema
from .training import build_optimizer, clip_gradients

__all__ = [
    "IR",
    "REGISTRY",
    "ComponentConfig",
    "Diagnostic",
    "LoadedSpec",
    "Span",
    "Spec",
    "SpecError",
    "analyze",
    "build_ir",
    "build_model",
    "build_optimizer",
    "clip_gradients",
    "json_schema",
    "load_spec",
    "load_spec_text",
    "register",
]
