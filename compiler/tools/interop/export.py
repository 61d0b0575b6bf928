"""Export: `export_program` captures a compiled model with `torch.export` (batch and tokens
dynamic, tokens bounded by the spec's context); `save_program` writes it as a `.pt2` archive and
`export_onnx` converts it with PyTorch's dynamo ONNX exporter. ONNX inputs and outputs carry the
spec's input and output names; `check_onnx` runs the file in onnxruntime against PyTorch.

onnx/onnxscript and onnxruntime are optional and imported only by the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from compiler.language.diagnostics import SpecError
from compiler.tools.interop._common import _error, _require
from compiler.tools.outputs import write_with
from runtime.model import GraphModel

if TYPE_CHECKING:
    from torch.export import ExportedProgram


def example_inputs(model: GraphModel, batch: int = 2, tokens: int = 8) -> tuple[Tensor, ...]:
    """Random inputs in the spec's declaration order, drawn from the spec's seed."""
    from compiler.tools.inputs import random_inputs

    device = next(model.parameters()).device
    drawn = random_inputs(
        model.spec, batch=batch, tokens=min(tokens, _context(model)), device=device
    )
    return tuple(drawn[name] for name in model.input_names)


def _context(model: GraphModel) -> int:
    return min(spec.context for spec in model.spec.inputs.values())


def _dynamic_shapes(model: GraphModel, inputs: tuple[Tensor, ...]) -> tuple[Any, ...] | None:
    """Batch and tokens dynamic for every input (all inputs share both); tokens at most the
    spec's context, which is what `runtime.ports.check_context` enforces at run time. A dimension
    of size 1 in the example cannot be dynamic (torch.export specialises 0 and 1)."""
    from torch.export import Dim

    batch, tokens = inputs[0].shape[0], inputs[0].shape[1]
    context = _context(model)
    dims: dict[int, Any] = {}
    if batch > 1:
        dims[0] = Dim("batch", min=1, max=2**20)
    if tokens > 1 and context > 1:
        dims[1] = Dim("tokens", min=1, max=context)
    return ((dims,) * len(inputs),)


def export_program(
    model: GraphModel,
    inputs: tuple[Tensor, ...] | None = None,
    *,
    dynamic: bool = True,
    source: str = "<model>",
) -> ExportedProgram:
    """`torch.export` of `model` in eval mode. The program's module returns the same dict of
    outputs by name. Capture failures (a data-dependent loop, say) are a `SpecError` naming
    `source`, with the reason torch gave."""
    inputs = example_inputs(model) if inputs is None else inputs
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(
            model, inputs, dynamic_shapes=_dynamic_shapes(model, inputs) if dynamic else None
        )
    except Exception as exc:  # noqa: BLE001 - torch's tracer raises many types; report its reason
        raise SpecError(
            [
                _error(
                    source,
                    f"torch.export cannot capture this model: {type(exc).__name__}: {_first_line(exc)}",
                    _export_hint(model, dynamic),
                )
            ]
        ) from None
    finally:
        model.train(was_training)


def _export_hint(model: GraphModel, dynamic: bool) -> str:
    if model.federation.plan.mode == "equilibrium":
        return (
            "equilibrium feedback stops when the residual falls below its tolerance, a "
            "data-dependent loop that cannot be captured; export the spec with `mode: unroll`"
        )
    if dynamic:
        return "try a static export (`--static`), which fixes batch and tokens to the example's"
    return "this part of the model cannot be captured by torch.export yet"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def save_program(
    model: GraphModel,
    path: str | Path,
    inputs: tuple[Tensor, ...] | None = None,
    *,
    dynamic: bool = True,
    source: str = "<model>",
) -> Path:
    """Write `torch.export`'s program to a `.pt2` archive (`torch.export.load` reads it)."""
    program = export_program(model, inputs, dynamic=dynamic, source=source)
    return write_with(path, lambda staged: torch.export.save(program, str(staged)))


def export_onnx(
    model: GraphModel,
    path: str | Path,
    inputs: tuple[Tensor, ...] | None = None,
    *,
    dynamic: bool = True,
    source: str = "<model>",
) -> Path:
    """ONNX through PyTorch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the
    default since torch 2.9; the TorchScript exporter is deprecated). Graph inputs are named as
    the spec's inputs, outputs as its outputs, in declaration order."""
    _require("onnxscript", "ONNX export")
    inputs = example_inputs(model) if inputs is None else inputs
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model, inputs) if dynamic else None,
            input_names=list(model.input_names),
            output_names=list(model.outputs),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; report its reason
        raise SpecError(
            [
                _error(
                    source,
                    f"ONNX export failed: {_onnx_reason(exc)}",
                    "operators without an ONNX translation cannot be exported; "
                    "`--format pt2` (torch.export) may still capture the model",
                )
            ]
        ) from None
    finally:
        model.train(was_training)
    # staged under the final name, so external weights (`path.data`) are named to match
    return write_with(path, lambda staged: program.save(str(staged)))


def _onnx_reason(exc: BaseException) -> str:
    """The innermost cause: the exporter wraps the useful message ("No ONNX function found for
    aten.linalg_matrix_exp") in two layers of generic advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {_first_line(exc)}"


def check_onnx(
    model: GraphModel,
    path: str | Path,
    inputs: tuple[Tensor, ...] | None = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU) on `inputs` and return, per output, the largest
    absolute difference from PyTorch's eval-mode outputs; a `SpecError` naming the file if any
    exceeds `atol + rtol * max|output|`."""
    ort = _require("onnxruntime", "checking an ONNX file")
    inputs = example_inputs(model, batch=3, tokens=5) if inputs is None else inputs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {
        name: value.cpu().numpy() for name, value in zip(model.input_names, inputs, strict=True)
    }
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = {k: v.cpu().float() for k, v in model(*inputs).items()}
    finally:
        model.train(was_training)
    differences = {
        name: float((torch.from_numpy(got[name]).float() - value).abs().max())
        for name, value in expected.items()
    }
    wrong = [
        f"`{name}` differs by {differences[name]:.3g}"
        for name, value in expected.items()
        if differences[name] > atol + rtol * float(value.abs().max())
    ]
    if wrong:
        raise SpecError(
            [
                _error(
                    str(path),
                    "onnxruntime disagrees with PyTorch: " + ", ".join(wrong),
                    "an operator translated differently; export with `--format pt2` instead",
                )
            ]
        )
    return differences
