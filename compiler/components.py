"""The built-in components (docs/designs.md, design 003, and the lattice layout of design 002):
their spec configs, registered with the runtime modules that implement them.

Each config class is the single description of its component: the JSON Schema, the README's
reference and the validation errors come from its fields. The runtime imports are deferred to the
builders, so validating a spec never imports a module it does not use.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, Strict

from compiler import counting
from compiler.language.capabilities import Capabilities
from compiler.language.registry import REGISTRY, Component, ComponentConfig, register
from compiler.language.spec import Int, LatticeAttention, Real

# --------------------------------------------------------------------------- attention


def _lattice(**context: Any) -> Any:
    """The lattice layout's attention (design 002); its options reach it resolved, as the
    `layout` the transformer config carries (`compiler.passes.plan.lattice_config`)."""
    from runtime.attention import lattice

    return lattice.LatticeAttention(**context)


REGISTRY.add(
    Component(
        "attention",
        "lattice",
        LatticeAttention,
        build=_lattice,
        level="lattice",
        check=lambda ir, data, head_width: _check_lattice(ir, data, head_width),
        parameters=counting.lattice_attention,
    )
)


class SDPA(ComponentConfig):
    """Plain scaled dot-product attention through the fused kernels (flash / memory-efficient)."""

    kind: Literal["sdpa"] = "sdpa"


class SlidingWindow(ComponentConfig):
    """Sliding-window attention: each query sees the `window` nearest keys (causal: the last `window`)."""

    kind: Literal["sliding_window"] = "sliding_window"
    window: Annotated[Int, Field(ge=1, le=1 << 22)] = Field(
        description="Keys each query sees, itself included."
    )


class AdaptiveSpan(ComponentConfig):
    """Adaptive span (Sukhbaatar et al. 2019; docs/designs.md, design 003), the sound reading of
    AdaptiveSpan: each head learns how far back it looks through a soft distance mask."""

    kind: Literal["adaptive_span"] = "adaptive_span"
    max_span: Annotated[Int, Field(ge=1, le=1 << 22)] | None = Field(
        None, description="Longest span a head may learn; default: the context."
    )
    ramp: Annotated[Int, Field(ge=1, le=1 << 16)] = Field(
        32, description="Width of the mask's linear ramp, in tokens."
    )
    init: Annotated[Real, Field(ge=0, le=1)] = Field(
        1.0, description="Initial span as a fraction of `max_span`."
    )
    sharpen: Annotated[bool, Strict()] = Field(
        False,
        description="AdaptiveSpan's temperature: scores divided by 1 + temp_scale * (1 - span / max_span).",
    )
    temp_scale: Annotated[Real, Field(ge=0, le=100)] = Field(
        0.01, description="Strength of the sharpening."
    )
    span_loss: Annotated[Real, Field(ge=0, le=1e3)] = Field(
        0.0, description="Weight of the L1 penalty on spans (a training term; 0: off)."
    )


class LocalGlobal(ComponentConfig):
    """Local-global attention (docs/designs.md, design 003), as in Longformer (Beltagy et al. 2020):
    a sliding window plus global tokens that every query sees."""

    kind: Literal["local_global"] = "local_global"
    window: Annotated[Int, Field(ge=1, le=1 << 22)] = Field(
        description="Keys each query sees around it, itself included."
    )
    global_tokens: Annotated[Int, Field(ge=0, le=1 << 16)] = Field(
        1, description="The first tokens, seen by every query (and, non-causal, seeing every key)."
    )


class RelativeForce(ComponentConfig):
    """Relative force (docs/designs.md, design 003): scores from emitter/receptor fields between
    tokens mixed with multi-hop topological paths (O(heads * tokens^2) memory)."""

    kind: Literal["relative_force"] = "relative_force"
    hop_levels: Annotated[Int, Field(ge=1, le=16)] = Field(
        3, description="Path lengths combined in the topological term."
    )


class Myelinated(ComponentConfig):
    """The myelinated layer (docs/designs.md, design 003): sub-layers that tokens and examples may
    skip by learned importance, layer jumps chosen by a policy, a gated working memory."""

    kind: Literal["myelinated"] = "myelinated"
    sublayers: Annotated[Int, Field(ge=1, le=64)] = Field(3, description="Sub-layers (nodes).")
    sparsity_threshold: Annotated[Real, Field(ge=0, le=1)] = Field(
        0.1, description="Importance above which a token takes part in a sub-layer's attention."
    )


# plain attention and RoPE slice into a fractal's sub-models; the other components do not
register(
    "attention",
    config=SDPA,
    level="scores",
    capabilities=Capabilities(in_fractal=True),
    parameters=counting.no_parameters,
)(lambda **kw: _score_module("sdpa", kw))
for _config, _count in (
    (SlidingWindow, counting.no_parameters),
    (AdaptiveSpan, counting.adaptive_span),
    (LocalGlobal, counting.no_parameters),
):
    register("attention", config=_config, level="scores", parameters=_count)(
        lambda *, _name=_config.model_fields["kind"].default, **kw: _score_module(_name, kw)
    )
for _config, _count in (
    (RelativeForce, counting.relative_force),
    (Myelinated, counting.myelinated),
):
    register("attention", config=_config, level="mixer", parameters=_count)(
        lambda *, _name=_config.model_fields["kind"].default, **kw: _mixer_module(_name, kw)
    )


def _score_module(name: str, options: dict[str, Any]) -> Any:
    from runtime.attention.variants import ATTENTION_KINDS

    return ATTENTION_KINDS[name](**options)


def _mixer_module(name: str, options: dict[str, Any]) -> Any:
    from runtime.attention.mixers import MIXER_KINDS

    return MIXER_KINDS[name](**options)


# --------------------------------------------------------------------------- rotary embeddings


class Rope(ComponentConfig):
    """Rotary position embedding (Su et al. 2021), halves layout, fixed frequencies."""

    kind: Literal["rope"] = "rope"


class LearnedRope(ComponentConfig):
    """RoPE whose frequencies are learned, starting from RoPE's (docs/designs.md, design 003)."""

    kind: Literal["learned_rope"] = "learned_rope"
    learned: Annotated[bool, Strict()] = Field(
        True, description="Learn the frequencies (false: RoPE's, fixed)."
    )


class Givens(ComponentConfig):
    """Givens rotations in chosen coordinate pairs of each head, turning with position at learned
    rates (design 003's pair rotations made position-dependent; docs/designs.md)."""

    kind: Literal["givens"] = "givens"
    pairs: Literal["adjacent", "halves"] = Field(
        "adjacent",
        description="Which coordinates turn together: `adjacent`: (0,1), (2,3), ... (the original "
        "layout); `halves`: (i, i + d/2), which is RoPE.",
    )
    learned: Annotated[bool, Strict()] = Field(True, description="Learn the rates.")


class Quaternion(ComponentConfig):
    """3-D rotations of each triple of head dimensions about a unit axis, by a unit quaternion
    (design 003's quaternion rotary with a correct rotation formula: docs/designs.md)."""

    kind: Literal["quaternion"] = "quaternion"
    axes: Literal["learned", "fixed"] = Field(
        "learned", description="Learn the rotation axes (they start spread over the sphere)."
    )
    learned: Annotated[bool, Strict()] = Field(True, description="Learn the rates.")


def _rope(**kw: Any) -> Any:
    from runtime.transformer import RotaryEmbedding

    return RotaryEmbedding(kw["head_width"], kw["context"], kw["theta"], kw["scales"])


def _rotary(name: str, kw: dict[str, Any]) -> Any:
    from runtime.attention.rotary import ROTARY_KINDS

    return ROTARY_KINDS[name](**kw)


register(
    "rotary",
    config=Rope,
    capabilities=Capabilities(in_fractal=True),
    parameters=counting.no_parameters,
)(_rope)
for _config, _count in (
    (LearnedRope, counting.learned_frequencies),
    (Givens, counting.learned_frequencies),
    (Quaternion, counting.quaternion),
):
    register("rotary", config=_config, parameters=_count)(
        lambda *, _name=_config.model_fields["kind"].default, **kw: _rotary(_name, kw)
    )


# --------------------------------------------------------------------------- optimizers, schedules

LearningRate = Annotated[Real, Field(gt=0, le=10)]
WeightDecay = Annotated[Real, Field(ge=0, le=10)]


class AdamW(ComponentConfig):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay."""

    kind: Literal["adamw"] = "adamw"
    lr: LearningRate = Field(3e-4, description="Peak learning rate.")
    betas: Annotated[
        list[Annotated[Real, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)
    ] = Field([0.9, 0.95], description="Decay rates of the first and second moments.")
    weight_decay: WeightDecay = Field(
        0.1, description="Decoupled weight decay on matrices (not on norms, biases or gains)."
    )


class SGD(ComponentConfig):
    """Stochastic gradient descent with optional (Nesterov) momentum."""

    kind: Literal["sgd"] = "sgd"
    lr: LearningRate = Field(1e-2, description="Peak learning rate.")
    momentum: Annotated[Real, Field(ge=0, lt=1)] = Field(0.9, description="Momentum.")
    nesterov: Annotated[bool, Strict()] = Field(False, description="Nesterov momentum.")
    weight_decay: WeightDecay = Field(0.0, description="L2 weight decay.")


class FAM(ComponentConfig):
    """Frequency-adaptive momentum (docs/designs.md, design 003): momentum set per parameter by the
    band powers of its gradient's spectrum, with rules per parameter kind."""

    kind: Literal["fam"] = "fam"
    lr: LearningRate = Field(1e-3, description="Peak learning rate.")
    alpha: Annotated[Real, Field(ge=0, lt=1)] = Field(0.9, description="Base momentum.")
    beta: Annotated[Real, Field(ge=0, lt=1)] = Field(
        0.99, description="Smoothing of the band powers."
    )
    weight_decay: WeightDecay = Field(0.0, description="Weight decay added to the gradient.")
    n_bands: Annotated[Int, Field(ge=1, le=256)] = Field(8, description="Frequency bands.")
    fam_start_step: Annotated[Int, Field(ge=0, le=10**9)] = Field(
        100, description="Plain momentum until this step."
    )
    min_size: Annotated[Int, Field(ge=0, le=10**12)] = Field(
        256, description="Parameters with at most this many elements keep plain momentum."
    )


def _adamw(model: Any, lr: float, betas: list[float], weight_decay: float) -> Any:
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def _sgd(model: Any, **options: Any) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, **options)


def _fam(model: Any, **options: Any) -> Any:
    from runtime.optim import FAM as FAMOptimizer
    from runtime.optim import fam_param_groups

    spec = getattr(model, "spec", None)  # gradient samples drawn from the spec's seed
    return FAMOptimizer(fam_param_groups(model), seed=spec.seed if spec else 0, **options)


register("optimizer", config=AdamW)(_adamw)
register("optimizer", config=SGD)(_sgd)
register("optimizer", config=FAM)(_fam)


class Constant(ComponentConfig):
    """The optimizer's learning rate throughout."""

    kind: Literal["constant"] = "constant"


class WarmupCosine(ComponentConfig):
    """Linear warm-up, an optional plateau, then a half cosine down to `min_lr` (the original
    FAMScheduler, which ran past the end into a rising cosine: here it stays at `min_lr`)."""

    kind: Literal["warmup_cosine"] = "warmup_cosine"
    warmup: Annotated[Int, Field(ge=0, le=10**9)] = Field(100, description="Warm-up steps.")
    decay_start: Annotated[Int, Field(ge=0, le=10**9)] | None = Field(
        None, description="Step where the cosine begins; default: the end of warm-up."
    )
    warmup_start_lr: Annotated[Real, Field(ge=0, le=10)] = Field(
        0.0, description="Learning rate at step 0."
    )
    min_lr: Annotated[Real, Field(ge=0, le=10)] = Field(
        0.0, description="Learning rate at the last step and after."
    )


def _constant(optimizer: Any, steps: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _warmup_cosine(optimizer: Any, steps: int, warmup: int, decay_start: int | None, **kw: Any):
    from runtime.optim import WarmupCosine as Schedule

    return Schedule(optimizer, warmup, steps, decay_start=decay_start, **kw)


register("schedule", config=Constant)(_constant)
register("schedule", config=WarmupCosine)(_warmup_cosine)


def _check_lattice(ir: Any, data: dict, head_width: int) -> list:
    """A lattice layout needs one cell per head, a head per key/value head, and head room for the
    two phase dimensions."""
    s, origin, name = data["settings"], data["settings_from"], data["name"]
    attention = s["attention"]
    where = origin["attention"]
    found = []
    cells = math.prod(attention.lattice.shape)
    if cells != s["heads"]:
        shape = " x ".join(map(str, attention.lattice.shape))
        found.append(
            ir.error(
                (*where, "lattice", "shape"),
                f"the lattice {shape} has {cells} cells but node `{name}` has {s['heads']} heads",
                "one head sits on each cell: make the product of `shape` equal `heads`",
            )
        )
    if s["kv_heads"] is not None and s["kv_heads"] != s["heads"]:
        found.append(
            ir.error(
                origin["kv_heads"],
                f"node `{name}` has a lattice layout, whose phase term is per head, and `kv_heads: {s['kv_heads']}`",
                "leave `kv_heads` unset (every head its own keys) with a lattice layout",
            )
        )
    low, high = attention.oscillator.frequency_range
    if low > high:
        found.append(
            ir.error(
                (*where, "oscillator", "frequency_range"),
                f"`frequency_range` runs from {low} down to {high}",
                "write it as [low, high]",
            )
        )
    if head_width < 4:
        found.append(
            ir.error(
                origin["heads"],
                f"node `{name}` has heads of width {head_width}; a lattice head gives 2 dimensions to its "
                "phase term and needs at least 2 for content",
                "use fewer heads or a wider node (head width at least 4)",
            )
        )
    variations = s["variations"]
    for i, heads in enumerate((variations.heads or ()) if variations is not None else ()):
        if heads != s["heads"]:
            found.append(
                ir.error(
                    (*origin["variations"], "heads", i),
                    f"node `{name}` has a lattice layout with one head per cell; a layer cannot draw "
                    f"{heads} heads",
                    "remove `heads` from `variations` on a lattice node",
                )
            )
    return found
