"""GPT-2 weights: `load_gpt2_weights(model, state_dict)` copies a Hugging Face `GPT2Model` /
`GPT2LMHeadModel` state dict into a GPT-2-shaped transformer node (Radford et al. 2019); see its
docstring for the mapping. `gpt2_spec_text(config)` writes the spec of a `GPT2Config`, and
`from_gpt2(hf_model)` does both. transformers itself is never imported here: the functions take
its objects (a config, a state dict, a model).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.tools.interop._common import _error
from runtime.model import GraphModel, NodeHandle
from runtime.transformer import Transformer

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
    chosen = {
        # every attention but plain SDPA is a registered component, the lattice layout included
        "attention": cfg.variant and f"the attention component `{cfg.variant.name}`",
        "layer_settings": cfg.layer_settings and "per-layer variations",
    }
    for setting, what in chosen.items():
        if what:
            problems.append(
                Diagnostic(
                    span(setting),
                    f"node `{name}` uses {what}; GPT-2 has plain multi-head attention in every layer",
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
