"""Interop with the rest of the PyTorch world: the Hugging Face Hub mixin, export, GPT-2 weights.

* **Hub directories.** `save_pretrained(model, dir)` / `from_pretrained(dir)` go through
  huggingface_hub's `ModelHubMixin`, whose hooks call the project's own checkpoint format
  (`compiler.tools.checkpoint`): `model.safetensors` with the spec embedded in its header, `spec.yaml`
  beside it, a `config.json` naming the spec's digest and a model card. The spec is the model's
  identity, so loading recompiles it and loads the weights strictly; a directory whose files
  disagree (an edited `spec.yaml`, a `config.json` of another model) is refused. Local
  directories only: a Hub id is refused before any network access.
* **Export.** `export_program` captures a compiled model with `torch.export` (batch and tokens
  dynamic, tokens bounded by the spec's context); `save_program` writes it as a `.pt2` archive and
  `export_onnx` converts it with PyTorch's dynamo ONNX exporter. ONNX inputs and outputs carry the
  spec's input and output names; `check_onnx` runs the file in onnxruntime against PyTorch.
* **GPT-2.** `load_gpt2_weights(model, state_dict)` copies a Hugging Face `GPT2Model` /
  `GPT2LMHeadModel` state dict into a GPT-2-shaped transformer node (Radford et al. 2019); see its
  docstring for the mapping. `gpt2_spec_text(config)` writes the spec of a `GPT2Config`, and
  `from_gpt2(hf_model)` does both.

huggingface_hub, onnx/onnxscript, onnxruntime and transformers are optional and imported only by
the functions that need them, never by `epicycle validate` or `compile`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from runtime.model import GraphModel, NodeHandle
from runtime.transformer import Transformer

if TYPE_CHECKING:
    from torch.export import ExportedProgram

log = logging.getLogger(__name__)

CONFIG = "config.json"
LIBRARY = "epicycle"


def _error(file: str, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Span(file, 1, 1), message, hint)


def _require(module: str, purpose: str, package: str | None = None) -> Any:
    """Import an optional dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs the `{package or module}` package: pip install {package or module}"
        ) from None


# --------------------------------------------------------------------------- Hub directories


MODEL_CARD = """---
{{ card_data }}
---

# {{ spec_name }}

An epicycle model: a YAML graph spec compiled into a PyTorch module.
`spec.yaml` is the model's identity (SHA-256 `{{ spec_sha256 }}`, {{ parameters }} parameters);
`model.safetensors` holds the weights with that spec embedded in its header.

```python
from compiler.tools.interop import from_pretrained

model = from_pretrained("path/to/this/directory")  # recompiles spec.yaml, loads the weights strictly
outputs = model(...)  # a dict of the spec's outputs by name
```
"""


@functools.cache
def _hub_class() -> type:
    """`HubGraphModel`, created on first use so that huggingface_hub stays an optional import."""
    hub = _require("huggingface_hub", "save_pretrained/from_pretrained", "huggingface_hub")

    class HubGraphModel(
        GraphModel,
        hub.ModelHubMixin,
        library_name=LIBRARY,
        tags=["epicycle"],
        model_card_template=MODEL_CARD,
    ):
        """A `GraphModel` with huggingface_hub's `save_pretrained` / `from_pretrained` /
        `push_to_hub`. It holds the very modules of the model it was made from (`from_model`), so
        its `state_dict` has the same names and the two share their weights."""

        @classmethod
        def from_model(cls, model: GraphModel) -> HubGraphModel:
            if isinstance(model, cls):
                return model
            hub_model = cls(
                model.inputs,
                model.federation,
                model.outputs,
                model.wiring,
                dict(model.companions),
                model.companion_wiring,
                model.kinds,
            )
            hub_model.spec, hub_model.spec_text = model.spec, model.spec_text
            hub_model.spec_digest = model.spec_digest
            return hub_model.train(model.training)

        @classmethod
        def from_pretrained(  # type: ignore[override]
            cls, directory: str | Path, *, device: str | None = None, **kwargs: Any
        ) -> HubGraphModel:
            """Load a directory written by `save_pretrained` (local directories only)."""
            path = Path(directory)
            if not path.is_dir():
                raise SpecError(
                    [
                        _error(
                            str(directory),
                            "not a local directory",
                            "from_pretrained reads a directory written by save_pretrained; to use a "
                            "Hub repository, download it first (`hf download REPO --local-dir DIR`)",
                        )
                    ]
                )
            return super().from_pretrained(path, device=device, **kwargs)

        def _save_pretrained(self, save_directory: Path) -> None:
            from compiler.tools.checkpoint import FORMAT, save_checkpoint

            save_checkpoint(self, save_directory)
            config = {
                "library": LIBRARY,
                "format": FORMAT,
                "spec_name": self.spec.name,
                "spec_sha256": self.spec_digest,
                "parameters": _parameter_count(self),
            }
            (Path(save_directory) / CONFIG).write_text(
                json.dumps(config, indent=2) + "\n", encoding="utf-8"
            )

        def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
            kwargs = {
                "spec_name": self.spec.name,
                "spec_sha256": self.spec_digest,
                "parameters": f"{_parameter_count(self):,}",
                **kwargs,
            }
            return super().generate_model_card(*args, **kwargs)

        @classmethod
        def _from_pretrained(
            cls, *, model_id: str, device: str | None = None, config: Any = None, **_: Any
        ) -> HubGraphModel:
            from compiler.tools.checkpoint import (
                SPEC,
                WEIGHTS,
                load_checkpoint,
                read_checkpoint_spec,
            )

            directory = Path(model_id)
            embedded, header = read_checkpoint_spec(directory)
            spec_file = directory / SPEC
            if spec_file.is_file() and spec_file.read_text(encoding="utf-8") != embedded:
                raise SpecError(
                    [
                        _error(
                            str(spec_file),
                            f"this spec differs from the one embedded in {WEIGHTS}, which made the weights",
                            "restore spec.yaml (the embedded spec is the model), or compile the edited "
                            "spec and train it anew",
                        )
                    ]
                )
            if isinstance(config, Mapping) and config.get("spec_sha256") not in (
                None,
                header.get("spec_sha256"),
            ):
                raise SpecError(
                    [
                        _error(
                            str(directory / CONFIG),
                            f"{CONFIG} names spec sha256 {str(config['spec_sha256'])[:12]}, but "
                            f"{WEIGHTS} was made by spec {header.get('spec_sha256', '?')[:12]}",
                            "the directory mixes files of two models; save it again with save_pretrained",
                        )
                    ]
                )
            return cls.from_model(load_checkpoint(directory, device=device))

    return HubGraphModel


def __getattr__(name: str) -> Any:
    # `from compiler.tools.interop import HubGraphModel` builds the class (and imports the Hub) lazily.
    if name == "HubGraphModel":
        return _hub_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hub_model(model: GraphModel) -> Any:
    """`model` as a `HubGraphModel` sharing its modules: `.save_pretrained`, `.push_to_hub`."""
    return _hub_class().from_model(model)


def save_pretrained(model: GraphModel, directory: str | Path, **kwargs: Any) -> Path:
    """Write `model` to `directory` in the Hub layout (huggingface_hub's `ModelHubMixin`)."""
    hub_model(model).save_pretrained(directory, **kwargs)
    return Path(directory)


def from_pretrained(directory: str | Path, *, device: str | None = None) -> Any:
    """The model saved in `directory`, recompiled from its spec with its weights (strictly)."""
    return _hub_class().from_pretrained(directory, device=device)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- export


def example_inputs(model: GraphModel, batch: int = 2, tokens: int = 8) -> tuple[Tensor, ...]:
    """Random inputs in the spec's declaration order, drawn from the spec's seed."""
    generator = torch.Generator().manual_seed(model.spec.seed)
    tokens = min(tokens, _context(model))
    values = []
    for name in model.input_names:
        spec = model.spec.inputs[name]
        if spec.kind == "tokens":
            values.append(torch.randint(0, spec.vocab, (batch, tokens), generator=generator))
        else:
            values.append(torch.randn(batch, tokens, spec.width, generator=generator))
    device = next(model.parameters()).device
    return tuple(v.to(device) for v in values)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


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


# --------------------------------------------------------------------------- GPT-2

# GPT-2's mask buffers (older checkpoints carry them): not weights, nothing to copy.
_GPT2_BUFFERS = ("attn.bias", "attn.masked_bias")
# transformers' names for GPT-2's activations -> the spec's `activation`
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def gpt2_spec_text(config: Any, *, name: str = "gpt2", tie: bool | None = None) -> str:
    """The spec of a Hugging Face `GPT2Config` (or its `to_dict()`): one transformer node with
    learned positions, tanh-GELU, LayerNorm with biases, causal attention, and an LM head tied to
    the token embedding as GPT-2's is (`tie_word_embeddings`)."""
    c = _config_dict(config)
    activation = _GPT2_ACTIVATIONS.get(c.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(
            f"GPT-2 activation {c['activation_function']!r} has no spec equivalent; "
            f"known: {', '.join(sorted(_GPT2_ACTIVATIONS))}"
        )
    inner = c.get("n_inner") or 4 * c["n_embd"]
    ratio = inner / c["n_embd"]
    ratio_text = f"{ratio:g}" if float(f"{ratio:g}") == ratio else repr(ratio)
    tied = c.get("tie_word_embeddings", True) if tie is None else tie
    return (
        f"# GPT-2 ({c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads), written by\n"
        "# compiler.tools.interop.gpt2_spec_text; load its weights with load_gpt2_weights.\n"
        "spec: 1\n"
        f"name: {name}\n"
        "seed: 0\n"
        "inputs:\n"
        f"  tokens: {{kind: tokens, vocab: {c['vocab_size']}, context: {c['n_positions']}}}\n"
        "nodes:\n"
        "  body:\n"
        "    kind: transformer\n"
        f"    width: {c['n_embd']}\n"
        f"    heads: {c['n_head']}\n"
        f"    layers: {c['n_layer']}\n"
        f"    mlp_ratio: {ratio_text}\n"
        f"    activation: {activation}\n"
        "    norm: layernorm\n"
        "    position: learned\n"
        "    bias: true\n"
        "    causal: true\n"
        f"    dropout: {c.get('resid_pdrop', 0.1):g}\n"
        "outputs:\n"
        f"  logits: {{from: body, kind: lm_head, tie: {'true' if tied else 'false'}}}\n"
    )


def from_gpt2(hf_model: nn.Module, *, name: str = "gpt2", device: str | None = None) -> GraphModel:
    """A `GPT2Model` / `GPT2LMHeadModel` as an epicycle model: its spec, then its weights."""
    from compiler.language.frontend import load_spec_text
    from compiler.pipeline import build_model

    text = gpt2_spec_text(hf_model.config, name=name)
    model = build_model(load_spec_text(text, f"<{name} spec>"), device=device)
    load_gpt2_weights(model, hf_model.state_dict(), config=hf_model.config)
    return model


def load_gpt2_weights(
    model: GraphModel,
    state_dict: Mapping[str, Tensor],
    *,
    node: str | None = None,
    config: Any = None,
    source: str = "<GPT-2 state dict>",
) -> list[str]:
    """Copy a Hugging Face GPT-2 state dict into transformer node `node` (default: the only one)
    of `model`, its token embedding and the LM heads reading it alone; return the parameters
    written. All or nothing: every problem found is raised at once (`SpecError`, spec settings
    located in the model's spec) before any weight changes.

    The mapping (transformers' names, with or without the `transformer.` prefix):

        wte                  -> inputs.<tokens>.table         the node's token input
        wpe                  -> positions                     needs `position: learned`, context = n_positions
        h.i.ln_1 / ln_2      -> blocks.i.norm_attn / norm_mlp needs `norm: layernorm`, `bias: true`
        h.i.attn.c_attn      -> blocks.i.attn.qkv             Conv1D stores (in, out): transposed;
                                                              fused [q | k | v] columns, heads
                                                              contiguous: the same layout as ours
        h.i.attn.c_proj      -> blocks.i.attn.proj            transposed
        h.i.mlp.c_fc / c_proj-> blocks.i.mlp.fc / proj        transposed
        ln_f                 -> norm_out
        lm_head (or wte)     -> outputs.<lm_head>.proj        GPT-2 ties it to wte

    What makes the function the same, not just the shapes: GPT-2 is pre-norm with a final norm
    (as `runtime.transformer.Block`), scales scores by 1/sqrt(head width) (as SDPA does), uses
    LayerNorm epsilon 1e-5 (as `MemberNorm`), and `gelu_new`, the tanh approximation
    (`activation: gelu_tanh`). With `config` (a `GPT2Config` or its dict) these and the head count,
    which the fused weights cannot show, are checked too; without it GPT-2's published settings
    are assumed. Dropout rates may differ: they do not act in eval mode.
    """
    from compiler.language.frontend import load_spec_text

    source_map = load_spec_text(model.spec_text, f"<{model.spec.name} spec>").source
    problems: list[Diagnostic] = []
    target = _find_transformer(model, node)
    name, cfg = target.name, target.plan.config
    span = functools.partial(_setting_span, source_map, name)

    expected = {
        "position": ("learned", "GPT-2 learns absolute positions (wpe)"),
        "norm": ("layernorm", "GPT-2 normalises with LayerNorm"),
        "bias": (True, "GPT-2's linear maps and norms have biases"),
        "causal": (True, "GPT-2 is a causal language model"),
    }
    activation = "gelu_tanh"
    if config is not None:
        c = _config_dict(config)
        activation = _GPT2_ACTIVATIONS.get(c.get("activation_function", "gelu_new"), "?")
        eps = target.module.norm_out.eps
        problems += _gpt2_config_problems(c, cfg, eps, span, source)
    expected["activation"] = (activation, "GPT-2's MLP activation (gelu_new is tanh-GELU)")
    for setting, (want, why) in expected.items():
        have = getattr(cfg, setting)
        if have != want:
            problems.append(
                Diagnostic(
                    span(setting),
                    f"node `{name}` has `{setting}: {_yaml(have)}`; {why}",
                    f"set `{setting}: {_yaml(want)}` to load GPT-2 weights",
                )
            )
    for setting, why in (
        ("attention", "a lattice layout"),
        ("variant", "a registered attention component"),
        ("layer_settings", "per-layer variations"),
    ):
        if getattr(cfg, setting):
            problems.append(
                Diagnostic(
                    span("attention" if setting == "variant" else setting),
                    f"node `{name}` uses {why}; GPT-2 has plain multi-head attention in every layer",
                    "remove it to load GPT-2 weights",
                )
            )
    if cfg.kv_heads not in (None, cfg.heads):
        problems.append(
            Diagnostic(
                span("kv_heads"),
                f"node `{name}` has `kv_heads: {cfg.kv_heads}`; GPT-2 has one key/value head per query head",
                "remove `kv_heads`",
            )
        )
    if type(target.module) is not Transformer:
        problems.append(
            Diagnostic(
                span("kind"), f"node `{name}` is a {target.kind}; GPT-2 is a plain transformer"
            )
        )
    token_input = _token_input(model, target, span, problems)
    if problems:
        raise SpecError(problems)

    weights = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    copies, used = _gpt2_copies(model, target.module, target.member, token_input, weights)
    problems += _state_dict_problems(weights, used, source)
    problems += _head_problems(model, target, token_input, weights, copies, source)
    for target, value, label in copies:
        if tuple(target.shape) != tuple(value.shape):
            problems.append(
                _error(
                    source,
                    f"`{label}` has shape {tuple(value.shape)} where node `{name}` needs "
                    f"{tuple(target.shape)}",
                    "the spec's width, layers, vocabulary, context or mlp_ratio differ from the "
                    "checkpoint's (gpt2_spec_text(config) writes a spec that fits)",
                )
            )
    if problems:
        raise SpecError(problems)
    with torch.no_grad():
        for target, value, _ in copies:
            target.copy_(value)
    written = {id(t): n for n, t in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return sorted({_parameter_name(t, written) for t, _, _ in copies})


def _find_transformer(model: GraphModel, node: str | None) -> NodeHandle:
    """The node to load into: `node`, or the model's only sub-model."""
    if node is not None:
        return model.node(node)
    found = [n for n in model.nodes() if n.address is not None]
    if len(found) != 1:
        names = [n.name for n in found]
        raise ValueError(f"this model has nodes {names}; name the one to load into")
    return found[0]


def _setting_span(source_map: Any, node: str, setting: str) -> Span:
    """Where a node's setting is written: on the node, else in `defaults.transformer`, else
    (a default value) the node itself."""
    field = {"layer_settings": "variations"}.get(setting, setting)
    for path in (("nodes", node, field), ("defaults", "transformer", field)):
        span, found = source_map.locate(path)
        if found == path:
            return span
    return source_map.span(("nodes", node), key=True)


def _yaml(value: Any) -> str:
    return (
        {True: "true", False: "false"}.get(value, str(value))
        if isinstance(value, bool)
        else str(value)
    )


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def _gpt2_config_problems(
    c: dict[str, Any], cfg: Any, eps: float, span: Any, source: str
) -> list[Diagnostic]:
    problems = []
    for key, setting, have in (
        ("n_embd", "width", cfg.width),
        ("n_head", "heads", cfg.heads),
        ("n_layer", "layers", cfg.layers),
    ):
        if key in c and c[key] != have:
            problems.append(
                Diagnostic(
                    span(setting),
                    f"`{setting}` is {have}, but the GPT-2 config has {key} = {c[key]}",
                    f"set `{setting}: {c[key]}`",
                )
            )
    if c.get("activation_function", "gelu_new") not in _GPT2_ACTIVATIONS:
        problems.append(
            _error(source, f"GPT-2 activation {c['activation_function']!r} has no spec equivalent")
        )
    theirs = c.get("layer_norm_epsilon", 1e-5)  # GPT-2's, and MemberNorm's default
    if theirs != eps:
        problems.append(
            _error(
                source,
                f"the GPT-2 config has layer_norm_epsilon = {theirs}; epicycle's LayerNorm uses {eps}",
                "the outputs would differ; only GPT-2's standard epsilon maps",
            )
        )
    for key, want, what in (
        ("scale_attn_weights", True, "scores scaled by 1/sqrt(head width)"),
        ("scale_attn_by_inverse_layer_idx", False, "no per-layer score scaling"),
        ("add_cross_attention", False, "no cross-attention sub-layers"),
    ):
        if c.get(key, want) != want:
            problems.append(
                _error(
                    source,
                    f"the GPT-2 config sets {key} = {c[key]}; the transformer node has {what}",
                )
            )
    return problems


def _token_input(
    model: GraphModel, target: NodeHandle, span: Any, problems: list[Diagnostic]
) -> str:
    """The node's one token input, read without a projection (then its table is GPT-2's wte)."""
    from runtime.ports import TokenInput

    group, read = target.plan, target.reads
    inputs = [inp for inp, _ in group.inputs]
    if (
        len(inputs) != 1
        or not isinstance(model.inputs[inputs[0]], TokenInput)
        or not isinstance(read[0], nn.Identity)
        or any(p is not None for p in group.perspectives)
    ):
        problems.append(
            Diagnostic(
                span("input"),
                f"node `{target.name}` must read exactly one token input of its own width, without a "
                "perspective, to take GPT-2's token embedding",
                "give the node `input: tokens` with a tokens input",
            )
        )
        return ""
    return inputs[0]


def _gpt2_copies(
    model: GraphModel,
    transformer: nn.Module,
    member: int,
    token_input: str,
    weights: dict[str, Tensor],
) -> tuple[list[tuple[Tensor, Tensor, str]], set[str]]:
    """(target, value, GPT-2 name) for every weight present; the names it expects."""

    def slot(param: Tensor) -> Tensor:
        return param if transformer.members == 1 else param[member]

    pairs: list[tuple[Tensor, str, bool]] = [
        (model.inputs[token_input].table.weight, "wte.weight", False),
        (slot(transformer.positions.weight), "wpe.weight", False),
        (slot(transformer.norm_out.weight), "ln_f.weight", False),
        (slot(transformer.norm_out.bias), "ln_f.bias", False),
    ]
    for i, block in enumerate(transformer.blocks):
        h = f"h.{i}."
        for ours, theirs, transpose in (
            (block.norm_attn, "ln_1", False),
            (block.norm_mlp, "ln_2", False),
            (block.attn.qkv, "attn.c_attn", True),
            (block.attn.proj, "attn.c_proj", True),
            (block.mlp.fc, "mlp.c_fc", True),
            (block.mlp.proj, "mlp.c_proj", True),
        ):
            pairs.append((slot(ours.weight), f"{h}{theirs}.weight", transpose))
            pairs.append((slot(ours.bias), f"{h}{theirs}.bias", False))
    used = {label for _, label, _ in pairs}
    copies = [
        (target, weights[label].T if transpose else weights[label], label)
        for target, label, transpose in pairs
        if label in weights
    ]
    return copies, used


def _state_dict_problems(
    weights: dict[str, Tensor], used: set[str], source: str
) -> list[Diagnostic]:
    missing = sorted(used - set(weights), key=_natural)
    unexpected = sorted(
        k
        for k in set(weights) - used - {"lm_head.weight"}
        if not (k.startswith("h.") and k.split(".", 2)[2] in _GPT2_BUFFERS)
    )
    problems = []
    if missing:
        problems.append(
            _error(
                source,
                f"the state dict lacks {len(missing)} GPT-2 weight(s): {', '.join(missing[:6])}"
                + (" ..." if len(missing) > 6 else ""),
                "the spec has more layers than the checkpoint, or this is not a GPT-2 state dict",
            )
        )
    if unexpected:
        problems.append(
            _error(
                source,
                f"the state dict has {len(unexpected)} weight(s) the node has no place for: "
                f"{', '.join(sorted(unexpected, key=_natural)[:6])}"
                + (" ..." if len(unexpected) > 6 else ""),
                "the checkpoint has more layers than the spec, or is not GPT-2's",
            )
        )
    return problems


def _head_problems(
    model: GraphModel,
    target: NodeHandle,
    token_input: str,
    weights: dict[str, Tensor],
    copies: list[tuple[Tensor, Tensor, str]],
    source: str,
) -> list[Diagnostic]:
    """Add the LM heads that read this node alone to `copies`; a tied head whose checkpoint head
    is not the embedding is refused (the spec would silently drop GPT-2's head)."""
    from runtime.ports import LinearHead

    if "wte.weight" not in weights:
        return []
    wte = weights["wte.weight"]
    head = weights.get("lm_head.weight", wte)
    problems = []
    for name, spec in model.spec.outputs.items():
        module = model.outputs[name]
        if spec.kind != "lm_head" or name not in target.outputs:
            continue
        if getattr(spec, "vocab_of", None) not in (None, token_input):
            continue
        if not isinstance(module, LinearHead):
            continue
        if module.proj.weight is model.inputs[token_input].table.weight:
            if head is not wte and not torch.equal(head, wte):
                problems.append(
                    _error(
                        source,
                        f"output `{name}` ties its head to the embedding, but this checkpoint's "
                        "lm_head differs from its wte",
                        f"set `tie: false` on output `{name}`",
                    )
                )
            continue
        copies.append(
            (module.proj.weight, head, "lm_head.weight" if head is not wte else "wte.weight")
        )
    return problems


def _parameter_name(target: Tensor, names: dict[int, str]) -> str:
    base = target if target._base is None else target._base
    return names.get(id(target)) or names.get(id(base), "?")


def _natural(key: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))
