"""The resolved configs and plans the compiler hands the runtime: frozen dataclasses of plain values.

They import no torch, so the compiler can plan and count a spec (`epicycle validate`) without
loading torch or torch-geometric; the modules that run them re-export them (`runtime.transformer.
TransformerConfig` is this `TransformerConfig`), and litgpt's `config.py` is the model: derived
values computed once, everything serialisable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


# --------------------------------------------------------------------------- lattice

PHASE_DIMS = 2


@dataclass(frozen=True)
class LatticeConfig:
    shape: tuple[int, ...]
    boundary: str = "periodic"
    neighbourhood: str = "moore"
    radius: float | None = None
    frequencies: str = "learned"
    frequency_range: tuple[float, float] = (0.95, 1.05)
    coupling: float = 0.1
    range: float = 1.0
    dt: float = 0.1
    substeps: int = 1
    eval_substeps: int | None = None  # Kuramoto updates in eval mode; None: `substeps`
    strength: float = 1.0
    token_frequency: float = 0.1
    phase_weight: float = 0.0  # training terms (see `lattice_regularisation`)
    phase_target: str = "synchrony"
    phase_schedule: tuple[str, int] = ("constant", 1000)
    coherence_weight: float = 0.0
    coherence_schedule: tuple[str, int] = ("constant", 1000)

    @property
    def cells(self) -> int:
        return math.prod(self.shape)


# --------------------------------------------------------------------------- transformer


@dataclass(frozen=True)
class Choice:
    """A registered component chosen by the spec (see `compiler.language.registry`): its name, its
    level (attention: `scores`, `mixer` or `lattice`), its builder and its options, hashable so that
    nodes choosing the same component with the same options still batch together."""

    name: str
    build: Callable[..., nn.Module]
    options: tuple[tuple[str, Any], ...] = ()
    level: str | None = None

    def make(self, **context: Any) -> nn.Module:
        return self.build(**context, **dict(self.options))


@dataclass(frozen=True)
class LayerSettings:
    """What one layer drew from the spec's `variations`."""

    activation: str
    heads: int
    dropout: float
    norm: str


@dataclass(frozen=True)
class TransformerConfig:
    """A resolved transformer: every field has its final value (the compiler fills them in)."""

    width: int
    heads: int
    layers: int
    context: int
    kv_heads: int | None = None
    mlp_width: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    position: str = "rope"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    bias: bool = False
    causal: bool = True
    attention: LatticeConfig | None = None  # a lattice layout; None: plain attention
    variant: Choice | None = None  # a registered attention component; None: fused SDPA
    rotary: Choice | None = (
        None  # a registered rotary embedding; None: RoPE (when position is rope)
    )
    layer_settings: tuple[LayerSettings, ...] = ()  # per layer, when the spec has `variations`

    def layer(self, index: int) -> TransformerConfig:
        """The config layer `index` is built with: this one, with what that layer drew."""
        if not self.layer_settings:
            return self
        drawn = self.layer_settings[index]
        return replace(
            self,
            activation=drawn.activation,
            heads=drawn.heads,
            kv_heads=self.kv_heads if self.kv_heads not in (None, drawn.heads) else None,
            dropout=drawn.dropout,
            norm=drawn.norm,
            layer_settings=(),
        )

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    @property
    def content_width(self) -> int:
        """Width of each head's content queries and keys (lattice heads give 2 to the phase term)."""
        return self.head_width - (PHASE_DIMS if self.attention is not None else 0)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def inner_width(self) -> int:
        return self.mlp_width or 4 * self.width

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


# --------------------------------------------------------------------------- federation

EDGE_KINDS = ("message", "mesh", "arbor", "pin_slot", "feedback", "cross")
EDGE_FEATURES = len(EDGE_KINDS) + 2  # one-hot kind, log ratio, delay


@dataclass(frozen=True)
class GroupPlan:
    """Same-shaped nodes that read the same input: run as one `Transformer` with stacked weights."""

    nodes: tuple[str, ...]
    indices: tuple[int, ...]  # positions on the message bus
    config: TransformerConfig
    inputs: tuple[tuple[str, int], ...]  # (input name, its width); their reads are summed
    rope_scales: tuple[float, ...] = ()  # per member: a gear's velocity; empty = all 1
    perspectives: tuple[str | None, ...] = ()  # per member: the frame it sees its inputs through
    kind: str = "transformer"  # the node kind whose `build` hook makes the group's module
    options: Any = None  # what that hook needs beyond `config` (a fractal's levels)


@dataclass(frozen=True)
class EdgePlan:
    source: int
    target: int
    delay: int
    kind: str
    ratio: float | None


@dataclass(frozen=True)
class FeedPlan:
    """An output fed back (`from: outputs.NAME`): the `width` values per token that output
    `output` gave `delay` steps earlier, through a learned linear map to the width of node
    `target` (a bus position), are added to that node's input."""

    output: str
    width: int
    target: int
    delay: int


# --------------------------------------------------------------------------- equilibrium

METHODS = ("fixed_point", "anderson", "broyden")
STOPS = ("relative", "absolute")


@dataclass(frozen=True)
class SolverSettings:
    """How one root-finding problem is solved: `method` (one of METHODS), at most `steps`
    evaluations of f, stopping when the `stop` residual (STOPS) of every example is below
    `tolerance`; `history` past iterates for Anderson and Broyden; `mixing` for fixed point and
    Anderson (the share of the new image taken each step)."""

    method: str = "fixed_point"
    steps: int = 30
    tolerance: float = 1e-4
    stop: str = "relative"
    history: int = 5
    mixing: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver `{self.method}`; the solvers are {METHODS}")
        if self.stop not in STOPS:
            raise ValueError(f"unknown stop criterion `{self.stop}`; use one of {STOPS}")
        if self.steps < 1 or self.history < 1 or not 0 < self.mixing <= 1 or self.tolerance <= 0:
            raise ValueError(f"solver settings out of range: {self}")


@dataclass(frozen=True)
class EquilibriumPlan:
    """The solver and gradient settings of `mode: equilibrium`, resolved (spec `feedback:`)."""

    forward: SolverSettings = SolverSettings()
    backward: SolverSettings = SolverSettings()
    eval_steps: int | None = None  # the forward's `steps` outside training (None: the same)
    grad: str = "implicit"  # implicit | phantom
    phantom_steps: int = 5
    phantom_damping: float = 1.0
    correction_states: int = 0  # trajectory states supervised in training (0: none)
    correction_decay: float = 0.8  # weight decay^k for the k-th state back from the fixed point
    jacobian_weight: float = 0.0  # 0: no Jacobian regularisation
    jacobian_every: int = 1  # training forwards between two estimates
    spectral_radius_every: int = 0  # forwards between two estimates (0: never)
    spectral_radius_iterations: int = 10

    def __post_init__(self) -> None:
        if self.grad not in GRADIENTS:
            raise ValueError(f"unknown equilibrium gradient `{self.grad}`; use one of {GRADIENTS}")


GRADIENTS = ("implicit", "phantom")


@dataclass(frozen=True)
class FederationPlan:
    nodes: tuple[str, ...]
    stages: tuple[tuple[GroupPlan, ...], ...]
    edges: tuple[EdgePlan, ...]
    bus_width: int
    aggregate: str = "sum"
    steps: int = 1
    backprop_steps: int = 1
    mode: str = "unroll"  # unroll | truncated | equilibrium
    tolerance: float = 1e-4  # equilibrium: relative change at which the fixed point is reached
    lipschitz: float | None = None  # equilibrium: bound on the Jacobian's spectral norm at z*
    power_iterations: int = 4  # per measurement, for `lipschitz`
    perspectives: tuple[tuple[str, str], ...] = ()  # (name, kind)
    time: bool = False  # a time axis: each step reads its own inputs; `step` carries the state
    equilibrium: EquilibriumPlan | None = (
        None  # solvers and gradients (None: fixed point, implicit)
    )
    feeds: tuple[FeedPlan, ...] = ()  # outputs fed back into nodes, in the spec's edge order

    @property
    def groups(self) -> tuple[GroupPlan, ...]:
        return tuple(g for stage in self.stages for g in stage)

    @property
    def max_delay(self) -> int:
        return max((e.delay for e in self.edges), default=0)

    @property
    def fed_outputs(self) -> tuple[str, ...]:
        """The outputs some edge feeds back, each once, in the order first fed."""
        return tuple(dict.fromkeys(f.output for f in self.feeds))

    @property
    def feed_delay(self) -> int:
        """How many steps of fed-back outputs the state keeps."""
        return max((f.delay for f in self.feeds), default=0)


# --------------------------------------------------------------------------- fractal

RESIDUALS = ("none", "upstream", "downstream")
STACK_WIDTH = 256  # `schedule: auto` stacks the levels of fractals up to this width on a GPU


@dataclass(frozen=True)
class FractalConfig:
    levels: int
    branching: int
    residual: str = "none"
    level_weights: tuple[float, ...] = ()  # loss weight per level; empty = all 1
    heads: str = (
        "narrow"  # narrow: every sub-model keeps all heads, narrower; subset: a share of them
    )
    schedule: str = "auto"  # how all levels run at once: stacked | blocks | auto (see `stacked`)
    level_batch: str = (
        "shared"  # shared: every level trains on the whole batch; split: a share each
    )

    def blocks(self, level: int) -> int:
        """Sub-models at `level`."""
        return self.branching**level

    def weights(self) -> tuple[float, ...]:
        return self.level_weights or (1.0,) * self.levels

    def stacked(self, width: int, device: torch.device) -> bool:
        """Whether all levels run as one stacked pass (`runtime.fractal.stacked`) rather than one
        block-diagonal pass per level. `auto` stacks on a GPU up to width STACK_WIDTH, where one
        pass of level 0's kernel count beats `levels` passes (BENCHMARKS.md, fractal levels);
        wider models and the CPU keep `blocks`, since stacking costs `levels` times level 0's
        matmul FLOPs against 1.75x for blocks."""
        if self.schedule == "auto":
            return device.type == "cuda" and width <= STACK_WIDTH
        return self.schedule == "stacked"


# --------------------------------------------------------------------------- companion

# The rigidity envelope's coefficient: |deviation| < ENVELOPE_COEFF * sqrt(sphere_dim).
ENVELOPE_COEFF = 0.02


@dataclass(frozen=True)
class CompanionConfig:
    """Sizes and knobs of a `GeoCompanion`; validated on construction (ValueError names the field).

    input_width: width of the host's feature tokens read and reconstructed.
    rows: V, rows of each token's sphere-normalised matrix M (>= 2: the rigidity metric
        averages over pairs of rows).
    sphere_dim: d, the rows live on S^(d-1) (>= 2).
    lens_dim: D, width of the isometric lens (>= sphere_dim) and of the spectrum.
    heads: attention heads across tokens; must divide lens_dim.
    layers: stacked spectral-alpha attention layers (the public code stacks 1 to 6).
    alpha_max: upper bound of every per-mode alpha; 0 <= alpha_init <= alpha_max <= 1.
    alpha_init: initial alpha of every mode (the design's sigmoid(-2) * 0.2 ~= 0.024).
    hidden: hidden width of the encoder's and the decoder's residual MLPs.
    depth: residual blocks in the encoder and in the decoder (>= 0).
    causal: attention across tokens is causal (token t sees tokens <= t).
    canonical_signs: sign-canonicalise each row of M (first non-zero coordinate positive).
    lens_trainable: the lens is learned (always exactly orthonormal) rather than a fixed
        random orthonormal matrix.
    cosine_weight: weight of (1 - cosine) added to the MSE objective (>= 0).
    """

    input_width: int
    rows: int = 32
    sphere_dim: int = 4
    lens_dim: int = 16
    heads: int = 4
    layers: int = 1
    alpha_max: float = 0.2
    alpha_init: float = 0.024
    hidden: int = 256
    depth: int = 1
    causal: bool = False
    canonical_signs: bool = True
    lens_trainable: bool = True
    cosine_weight: float = 0.0

    def __post_init__(self) -> None:
        positive = {
            "input_width": 1,
            "rows": 2,
            "sphere_dim": 2,
            "lens_dim": 1,
            "heads": 1,
            "layers": 1,
            "hidden": 1,
            "depth": 0,
        }
        for name, least in positive.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.lens_dim < self.sphere_dim:
            raise ValueError(
                f"lens_dim ({self.lens_dim}) must be >= sphere_dim ({self.sphere_dim}): "
                "an isometric lift cannot reduce dimension"
            )
        if self.lens_dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide lens_dim ({self.lens_dim})")
        for name in ("alpha_max", "alpha_init", "cosine_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max must lie in [0, 1], got {self.alpha_max}")
        if not 0.0 <= self.alpha_init <= self.alpha_max:
            raise ValueError(
                f"alpha_init must lie in [0, alpha_max={self.alpha_max}], got {self.alpha_init}"
            )
        if self.cosine_weight < 0:
            raise ValueError(f"cosine_weight must be >= 0, got {self.cosine_weight}")
        for name in ("causal", "canonical_signs", "lens_trainable"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def rigidity_envelope(self) -> float:
        """The critical frame deviation, 0.02 * sqrt(sphere_dim)."""
        return ENVELOPE_COEFF * math.sqrt(self.sphere_dim)
