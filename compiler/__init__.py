"""epicycle's compiler: YAML spec -> pydantic `Spec` -> graph IR -> passes -> `nn.Module`.

import compiler
model = compiler.build_model("specs/transformer.yaml")
logits = model(tokens)["logits"]

"Design 000" ... "design 004" in docstrings and comments name the sections of docs/designs.md.
"""

from compiler.ir import IR, build_ir
from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.frontend import LoadedSpec, load_spec, load_spec_text
from compiler.language.registry import REGISTRY, ComponentConfig, register
from compiler.language.spec import Spec, json_schema
from compiler.pipeline import analyze, build_model

# the training helpers load on first use: `epicycle validate` imports `compiler` and no training code
_LAZY = {"build_optimizer", "clip_gradients"}


def __getattr__(name: str):
    if name in _LAZY:
        from compiler.tools import training

        return getattr(training, name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")


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
