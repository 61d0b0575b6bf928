"""Spec version 1: the pydantic models that are the single source of the spec language.

The JSON Schema (`epicycle schema`), the reference in the README and the validation errors all come
from these classes. They describe structure only: each field's type, range and default, and the
`kind` that selects a variant. Relations between parts of a spec (an edge naming a node, heads
dividing a width, cycles, gear trains) are checked by the passes in `compiler/passes/`, which know
where each part was written.

Size limits are deliberately generous but finite: a width of 10^30 is a typo, not a model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from compiler.language.datafiles import declaration_conflict
from compiler.language.kinds import NodeField
from compiler.language.rational import PositiveRational
from compiler.language.registry import FAMILIES, ComponentField, link_components

SPEC_VERSION = 1

MAX_WIDTH = 1 << 20
MAX_HEADS = 4096
MAX_LAYERS = 10_000
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 22
MAX_NODES = 100_000
MAX_EDGES = 1_000_000
MAX_STEPS = 4096
MAX_DELAY = 64


def _real_number(value: Any) -> Any:
    """Floats accept ints but not booleans or strings: `dropout: "0.1"` is a typo worth naming."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError(
            "number_type", "expected a number, got {type}", {"type": _type_name(value)}
        )
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (int, float)):
        return f"`{getattr(value, 'text', None) or value}`"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


Int = Annotated[int, Strict()]
Real = Annotated[float, BeforeValidator(_real_number)]
Name = Annotated[
    str,
    Strict(),
    # a dot joins a sub-graph's name and the names inside it (`g.b1`); the front end refuses a
    # dot written by hand, so only the flattening of `kind: graph` makes such names
    StringConstraints(
        pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}(\.[A-Za-z_][A-Za-z0-9_\-]{0,63})*$",
        max_length=256,
    ),
]
Width = Annotated[Int, Field(ge=1, le=MAX_WIDTH)]
Heads = Annotated[Int, Field(ge=1, le=MAX_HEADS)]


def _name_list(what: str):
    """`from: sun` and `from: [sun, moon]` both mean a list of names (of nodes, or of inputs)."""

    def validate(value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise PydanticCustomError(
                "sources_type",
                "expected {article} {what} name or a list of {what} names, got {type}",
                {
                    "article": "an" if what[0] in "aeiou" else "a",
                    "what": what,
                    "type": _type_name(value),
                },
            )
        seen: set[str] = set()
        for item in value:
            if not isinstance(item, str):
                continue  # the item's own type error is reported by the list's validation
            if item in seen:
                raise PydanticCustomError(
                    "duplicate_name", "`{name}` is listed twice", {"name": item}
                )
            seen.add(item)
        return value

    return validate


Sources = Annotated[
    list[Name],
    BeforeValidator(_name_list("node")),
    Field(min_length=1, max_length=1024),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ],
            "description": "A node name, or a list of node names.",
        }
    ),
]


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys are errors, numbers must be finite."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=False
    )


# --------------------------------------------------------------------------- attention layouts


class Lattice(SpecModel):
    """Where the heads sit: an n-dimensional grid, one head per cell, numbered row-major."""

    shape: Annotated[
        list[Annotated[Int, Field(ge=1, le=4096)]], Field(min_length=1, max_length=8)
    ] = Field(description="Cells along each dimension; their product must equal the heads.")
    boundary: Literal["periodic", "open"] = Field(
        "periodic",
        description="`periodic` wraps every dimension around (a torus); `open` does not.",
    )
    neighbourhood: Literal["von_neumann", "moore"] = Field(
        "moore",
        description="`von_neumann`: the cells one step along one axis; `moore`: every cell within one "
        "step along each axis (diagonals too). Ignored when `radius` is set.",
    )
    radius: Annotated[Real, Field(gt=0, le=64)] | None = Field(
        None, description="Neighbours are all cells within this Euclidean distance."
    )


class Oscillator(SpecModel):
    """Each head is a Kuramoto oscillator (intrinsic frequency, phase) coupled to its neighbours."""

    frequencies: Literal["learned", "fixed"] = Field(
        "learned",
        description="Intrinsic frequencies, drawn from `frequency_range`, learned or fixed.",
    )
    frequency_range: Annotated[
        list[Annotated[Real, Field(gt=0, le=1e3)]], Field(min_length=2, max_length=2)
    ] = Field(
        [0.95, 1.05], description="Intrinsic frequencies are drawn uniformly from [low, high]."
    )
    coupling: Annotated[Real, Field(ge=0, le=1e3)] = Field(
        0.1, description="Initial coupling strength K (learned)."
    )
    range: Annotated[Real, Field(gt=0, le=1e3)] = Field(
        1.0,
        description="Initial lattice constant: neighbours couple with weight exp(-distance / range) (learned).",
    )
    dt: Annotated[Real, Field(gt=0, le=10)] = Field(
        0.1, description="Time step of the Kuramoto update."
    )
    substeps: Annotated[Int, Field(ge=1, le=256)] = Field(
        1, description="Kuramoto updates per forward pass."
    )
    eval_substeps: Annotated[Int, Field(ge=1, le=1024)] | None = Field(
        None,
        description="Kuramoto updates per forward pass in evaluation mode (`model.eval()`); unset: "
        "`substeps`. More oscillator steps at test time than in training can help (AKOrN, Miyato "
        "et al., ICLR 2025).",
    )


class Regulariser(SpecModel):
    """A training term with a weight and a schedule over training steps."""

    weight: Annotated[Real, Field(ge=0, le=1e6)] = Field(
        0.0, description="Weight in the loss (0: off)."
    )
    schedule: Literal["constant", "warmup", "anneal", "cosine"] = Field(
        "constant",
        description="How the weight changes with the step: `warmup` rises linearly to it over `steps`, "
        "`anneal` falls linearly to 0, `cosine` falls along a half cosine; `constant` stays.",
    )
    steps: Annotated[Int, Field(ge=1, le=10**9)] = Field(
        1000, description="Length of the warm-up or decay, in training steps."
    )


class PhaseRegulariser(Regulariser):
    target: Literal["synchrony", "diversity"] = Field(
        "synchrony",
        description="`synchrony` adds 1 - r (phases pulled together), `diversity` adds r (pushed apart); "
        "r is each layer's Kuramoto order parameter.",
    )


class LatticeTraining(SpecModel):
    """The design's training terms, added by `runtime.attention.lattice.lattice_regularisation(model, step)`."""

    phase: PhaseRegulariser = PhaseRegulariser()
    coherence: Regulariser = Field(
        Regulariser(),
        description="Spatial coherence: mean over neighbours of w * (1 - cos(theta_n - theta_h)), w the "
        "coupling weights: smooth phase fields across the lattice.",
    )


class LatticeAttention(SpecModel):
    """Lattice Oscillator attention (docs/designs.md, design 002): Kuramoto-oscillator heads whose
    phase adds `strength * cos(phase + token_frequency * frequency * (i - j))` to its scores."""

    kind: Literal["lattice"]
    lattice: Lattice
    oscillator: Oscillator = Oscillator()
    strength: Annotated[Real, Field(ge=0, le=1e3)] = Field(
        1.0, description="Initial amplitude of each head's phase term (learned)."
    )
    token_frequency: Annotated[Real, Field(gt=0, le=10)] = Field(
        0.1,
        description="Radians per token per unit of intrinsic frequency: how fast the term turns along the sequence.",
    )
    training: LatticeTraining = LatticeTraining()


# --------------------------------------------------------------------------- transformer settings


Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
Norm = Literal["layernorm", "rmsnorm"]
Dropout = Annotated[Real, Field(ge=0, lt=1)]


class DropoutRange(SpecModel):
    """A dropout rate drawn uniformly from [min, max] for each layer."""

    min: Dropout = Field(description="Lowest rate.")
    max: Dropout = Field(description="Highest rate.")


def _choices(what: str):
    return Field(None, min_length=1, max_length=64, description=f"The {what} a layer may take.")


class Variations(SpecModel):
    """Per-layer variations (docs/designs.md, design 003): each layer draws its own value
    of every field listed here, from the spec's `seed` and the node's name, so the same spec always
    builds the same layers. `epicycle compile` prints what each layer drew. (The original drew them
    from an unseeded `np.random`, so no two builds agreed.)"""

    activation: list[Activation] | None = _choices("activations")
    heads: list[Heads] | None = _choices("head counts (each must divide `width`)")
    dropout: Annotated[list[Dropout], Field(min_length=1, max_length=64)] | DropoutRange | None = (
        Field(None, description="Dropout rates to choose from, or a `{min, max}` range.")
    )
    norm: list[Norm] | None = _choices("norms")


class TransformerSettings(SpecModel):
    """Settings of a decoder-only transformer (nanoGPT / GPT-2 style, with modern options).

    Every field may be left out; it is then taken from `defaults.transformer`, and failing that
    from the default shown here.
    """

    width: Width | None = Field(None, description="Residual stream width (d_model).")
    heads: Heads | None = Field(None, description="Query heads; must divide `width`. Default 4.")
    kv_heads: Heads | None = Field(
        None,
        description="Key/value heads (multi-query or grouped-query attention); must divide `heads`.",
    )
    layers: Annotated[Int, Field(ge=1, le=MAX_LAYERS)] | None = Field(
        None, description="Blocks. Default 2."
    )
    mlp_ratio: Annotated[Real, Field(gt=0, le=64)] | None = Field(
        None, description="MLP inner width as a multiple of `width`. Default 4."
    )
    activation: Activation | None = Field(
        None, description="MLP activation; `swiglu`/`geglu` are gated (Shazeer 2020). Default gelu."
    )
    norm: Norm | None = Field(None, description="Default layernorm.")
    position: Literal["rope", "learned", "none"] | None = Field(
        None,
        description="Rotary embedding in attention (Su et al. 2021), a learned absolute table "
        "(GPT-2), or none. Default rope.",
    )
    rope_theta: Annotated[Real, Field(gt=0, le=1e9)] | None = Field(
        None, description="Default 10000."
    )
    dropout: Annotated[Real, Field(ge=0, lt=1)] | None = Field(None, description="Default 0.")
    bias: Annotated[bool, Strict()] | None = Field(
        None, description="Biases in linear layers and norms. Default false."
    )
    causal: Annotated[bool, Strict()] | None = Field(
        None, description="Causal attention mask. Default true."
    )
    attention: Annotated[Any, ComponentField("attention")] | None = Field(
        None,
        description="The attention component, by `kind`: `sdpa`, `sliding_window`, `adaptive_span`, "
        "`local_global`, `relative_force`, `myelinated`, `lattice` (heads on a lattice of coupled "
        "oscillators) or a registered one. Default: plain fused attention.",
    )
    rotary: Annotated[Any, ComponentField("rotary")] | None = Field(
        None,
        description="The rotary embedding when `position` is `rope`, by `kind`: `rope`, `learned_rope`, "
        "`givens`, `quaternion` or a registered one. Default: `rope`.",
    )
    variations: Variations | None = Field(
        None,
        description="Per-layer choices sampled from the spec's seed (docs/designs.md, design 003).",
    )


class MessageSettings(SpecModel):
    """How nodes exchange messages along edges (a torch-geometric MessagePassing layer)."""

    width: Width | None = Field(
        None,
        description="Width of the message bus; default: the widest node. Nodes of another width project in and out.",
    )
    aggregate: Literal["sum", "mean", "attention"] = Field(
        "sum",
        description="How a node combines its incoming messages: sum, mean, or `attention` (softmax weights "
        "from a learned query per node, keys of the messages and the edges' features).",
    )


class Perspective(SpecModel):
    """A learned frame shared by the gears that name it: how they see the shared input."""

    kind: Literal["rotation", "projection", "identity"] = Field(
        "rotation",
        description="`rotation`: a learned orthogonal map (exp of a skew-symmetric matrix, starting at the "
        "identity); `projection`: a learned linear map; `identity`: none.",
    )


class Defaults(SpecModel):
    transformer: TransformerSettings = TransformerSettings()
    message: MessageSettings = MessageSettings()


# --------------------------------------------------------------------------- inputs


class TokensInput(SpecModel):
    """Integer token ids `(batch, tokens)`, embedded into a learned table."""

    kind: Literal["tokens"]
    vocab: Annotated[Int, Field(ge=1, le=MAX_VOCAB)] = Field(description="Vocabulary size.")
    context: Annotated[Int, Field(ge=1, le=MAX_CONTEXT)] = Field(
        description="Longest sequence the model takes."
    )
    width: Width | None = Field(
        None, description="Embedding width; default: the width of the nodes that read it."
    )


class FeaturesInput(SpecModel):
    """Real-valued features `(batch, tokens, width)`, projected into each reading node."""

    kind: Literal["features"]
    width: Width = Field(description="Features per token.")
    context: Annotated[Int, Field(ge=1, le=MAX_CONTEXT)] = Field(
        1024, description="Longest sequence."
    )


Input = Annotated[TokensInput | FeaturesInput, Field(discriminator="kind")]


# --------------------------------------------------------------------------- nodes


InputNames = Annotated[
    list[Name],
    BeforeValidator(_name_list("input")),
    Field(max_length=64),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            "description": "An input name, a list of them (their reads are summed), or [] for none.",
        }
    ),
]


Node = Annotated[Any, NodeField()]
"""A node of the graph, by `kind`: any registered node kind (see `compiler.language.kinds`)."""


# --------------------------------------------------------------------------- edges and feedback


FED_BACK = "outputs."  # `from: outputs.NAME`: an edge that feeds output NAME back


class Edge(SpecModel):
    """Messages from one node's state to another's, for every token in parallel.

    `delay: d` reads the source's state from `d` feedback steps earlier, which is what makes a
    directed cycle legal; a cycle of edges all with `delay: 0` is an algebraic loop.

    `from: outputs.NAME` feeds an output's values back instead (design 000's "outputs are fed
    back into the model as inputs for the next step"): what output NAME gave `delay` steps earlier
    (at least 1), through the declared `projection` to the receiving node's width, is added to
    that node's input. Only per-token outputs (`lm_head`, `regression`) feed back.
    """

    source: Name = Field(
        alias="from",
        description="The node whose state is sent, or `outputs.NAME`: the values output NAME "
        "gave `delay` steps earlier (needs `delay` >= 1 and `projection`).",
    )
    to: Name = Field(description="The node that receives.")
    kind: Literal["message", "mesh", "arbor", "pin_slot", "feedback", "cross", "companion"] = Field(
        "message",
        description="`mesh`: meshing teeth (turns scale by teeth_from/teeth_to); `arbor`: same axle (equal "
        "turns); `pin_slot`: the Antikythera lunar anomaly coupling (mean ratio 1); `feedback`: must have a "
        "delay; `cross`: token-to-token cross-attention from the source's tokens; `companion`: attaches a "
        "`kind: companion` node to the host it reads; `message`: plain.",
    )
    delay: Annotated[Int, Field(ge=0, le=MAX_DELAY)] = Field(
        0, description="Feedback steps of delay."
    )
    ratio: PositiveRational | None = Field(
        None,
        description="Exact turns of `to` per turn of `from` (`223/19`); conditions the message. Between gears it "
        "defaults to the derived ratio and, on mesh/arbor/pin_slot edges, constrains the train.",
    )
    projection: Literal["linear"] | None = Field(
        None,
        description="Edges from `outputs.NAME` only, and required there: how the output's values "
        "are mapped to the receiving node's width. `linear`: a learned matrix, no bias.",
    )


Solver = Literal["fixed_point", "anderson", "broyden"]
History = Annotated[Int, Field(ge=1, le=64)]
Mixing = Annotated[Real, Field(gt=0, le=1)]


class BackwardSolve(SpecModel):
    """The implicit backward's own solve of g = J^T g + dL/dz*; unset fields take the forward's."""

    solver: Solver | None = Field(None, description="As `feedback.solver`; default: the forward's.")
    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="The most iterations; default: `feedback.steps`."
    )
    tolerance: Annotated[Real, Field(gt=0)] | None = Field(
        None, description="Residual at which the gradient counts as found; default: the forward's."
    )
    history: History | None = Field(None, description="As `feedback.history`.")
    mixing: Mixing | None = Field(None, description="As `feedback.mixing`.")


class PhantomGradient(SpecModel):
    """Phantom gradients (Geng et al. 2021): backpropagate through `steps` damped steps
    z <- (1 - damping) z + damping f(z) unrolled from the fixed point, instead of solving the
    implicit backward."""

    steps: Annotated[Int, Field(ge=1, le=64)] = Field(
        5, description="Steps unrolled with a tape (memory grows with them)."
    )
    damping: Mixing = Field(1.0, description="Share of f(z) in each step, in (0, 1].")


class FixedPointCorrection(SpecModel):
    """Fixed-point correction (Bai et al. 2022): the task loss is also applied to the outputs at
    `states` evenly spaced iterates of the training solve, weighted `decay^k` for the k-th back
    from the fixed point (the trainer adds them: `GraphModel.correction_loss`)."""

    states: Annotated[Int, Field(ge=1, le=64)] = Field(description="Trajectory states supervised.")
    decay: Mixing = Field(0.8, description="Weight ratio between neighbouring states, in (0, 1].")


class JacobianPenalty(SpecModel):
    """Jacobian regularisation (Bai, Koltun & Kolter 2021): a training term `weight` times a
    Hutchinson (random-projection) estimate of ||df/dz||_F^2 / dim at the fixed point."""

    weight: Annotated[Real, Field(gt=0)] = Field(description="Weight of the term in the loss.")
    every: Annotated[Int, Field(ge=1, le=1_000_000)] = Field(
        1, description="Training steps between two estimates (the term is 0 in between)."
    )


class SpectralRadiusMonitor(SpecModel):
    """Estimate the spectral radius of df/dz at the fixed point, which decides whether the solve
    converges, and report it (`model.report()`, `metrics.jsonl`)."""

    every: Annotated[Int, Field(ge=1, le=1_000_000)] = Field(
        1, description="Forward passes between two estimates."
    )
    iterations: Annotated[Int, Field(ge=2, le=1000)] = Field(
        10, description="Power iterations per estimate (one vector-Jacobian product each)."
    )


class Feedback(SpecModel):
    """Iterate the whole graph `steps` times; delayed edges carry state between iterations."""

    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)] = Field(
        description="Iterations of the graph (for `equilibrium`: the most solver iterations)."
    )
    mode: Literal["unroll", "truncated", "equilibrium"] = Field(
        "unroll",
        description="`unroll` backpropagates through every step; `truncated` through the last `backprop_steps`; "
        "`equilibrium` solves for the fixed point and backpropagates implicitly (memory independent of steps).",
    )
    backprop_steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="For `truncated`: steps that keep gradients (the last ones)."
    )
    solver: Solver | None = Field(
        None,
        description="For `equilibrium`: `fixed_point` (default), `anderson` (Anderson acceleration, "
        "Walker & Ni 2011) or `broyden` (limited-memory good Broyden, as Bai et al. 2019), each "
        "batched over the sequences of a batch.",
    )
    history: History | None = Field(
        None, description="For `anderson` and `broyden`: past iterates kept. Default 5."
    )
    mixing: Mixing | None = Field(
        None,
        description="For `fixed_point` and `anderson`: the share of f(z) in each step, in (0, 1] "
        "(damping below 1). Default 1.",
    )
    tolerance: Annotated[Real, Field(gt=0)] | None = Field(
        None,
        description="For `equilibrium`: residual at which the fixed point counts as found. Default 1e-4.",
    )
    stop: Literal["relative", "absolute"] | None = Field(
        None,
        description="For `equilibrium`: stop on the relative residual ||f(z) - z|| / ||f(z)|| "
        "(default, below 1) or the absolute ||f(z) - z||, per sequence, the largest of the batch.",
    )
    eval_iterations: Annotated[Int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None,
        description="For `equilibrium`: the most solver iterations outside training; default `steps`.",
    )
    backward: BackwardSolve | None = Field(
        None, description="For `equilibrium` with the implicit gradient: the backward's own solve."
    )
    grad: Literal["implicit", "phantom"] | None = Field(
        None,
        description="For `equilibrium`: `implicit` (the implicit function theorem, default) or "
        "`phantom` (see `phantom`).",
    )
    phantom: PhantomGradient | None = Field(None, description="For `grad: phantom`: its steps.")
    correction: FixedPointCorrection | None = Field(
        None, description="For `equilibrium`: supervise states along the solver's trajectory."
    )
    jacobian: JacobianPenalty | None = Field(
        None, description="For `equilibrium`: penalise ||df/dz||_F at the fixed point in training."
    )
    spectral_radius: SpectralRadiusMonitor | None = Field(
        None, description="For `equilibrium`: estimate and report rho(df/dz) at the fixed point."
    )
    lipschitz: Annotated[Real, Field(gt=0, lt=1)] | None = Field(
        None,
        description="For `equilibrium`: bound on the feedback map's local Lipschitz constant, the spectral norm "
        "of its Jacobian at the fixed point, so the solve and the implicit backward contract. Enforced in "
        "training by scaling what the delayed edges read (a stored `feedback_gain` <= 1), measured by power "
        "iteration as spectral normalisation measures a weight. A global bound through attention and "
        "LayerNorm does not exist; see the README's safety section.",
    )
    power_iterations: Annotated[Int, Field(ge=1, le=100)] | None = Field(
        None,
        description="For `lipschitz`: power iterations per training step, from a seeded start "
        "(each costs about three graph steps). Default 4.",
    )


class Time(SpecModel):
    """A time axis: the model simulates a system step by step (docs/designs.md, design 000).

    Every input arrives as a sequence of time steps, `(batch, time, tokens)` for tokens and
    `(batch, time, tokens, width)` for features. Each time step is one step of the graph on that
    step's inputs; a delayed edge reads the state its sender had `delay` time steps before (zero
    before the first), so the federation's state carries from step t to t+1; every output is
    produced per step, `(batch, time, ...)`. `model.init_state(batch, tokens)` and
    `model.step(state, inputs) -> (state, outputs)` stream one step at a time, and the forward
    over a whole sequence equals stepping through it."""


# --------------------------------------------------------------------------- outputs


class LMHeadOutput(SpecModel):
    """Next-token logits `(batch, tokens, vocab)` over a tokens input's vocabulary."""

    kind: Literal["lm_head"]
    source: Sources = Field(alias="from", description="Node(s) read; several are concatenated.")
    tie: Annotated[bool, Strict()] = Field(
        False, description="Share the weights of the token embedding (Press & Wolf 2017)."
    )
    vocab_of: Name | None = Field(
        None, description="The tokens input whose vocabulary is predicted; default: the only one."
    )


class RegressionOutput(SpecModel):
    """A linear read-out `(batch, tokens, width)`."""

    kind: Literal["regression"]
    source: Sources = Field(alias="from", description="Node(s) read; several are concatenated.")
    width: Width = Field(description="Values per token.")


class ClassificationOutput(SpecModel):
    """Class logits `(batch, classes)` from the token states, pooled."""

    kind: Literal["classification"]
    source: Sources = Field(alias="from", description="Node(s) read; several are concatenated.")
    classes: Annotated[Int, Field(ge=2, le=MAX_VOCAB)] = Field(
        description="Number of classes (at least 2)."
    )
    pool: Literal["mean", "last"] = Field(
        "mean", description="Pool the tokens' states by their mean or the last one."
    )


Output = Annotated[
    LMHeadOutput | RegressionOutput | ClassificationOutput, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- training


class OutputLoss(SpecModel):
    """What one output is trained with: `train.losses.OUTPUT`. The default by output kind:
    `cross_entropy` for `lm_head` (the next token) and `classification` (one class per example),
    `mse` for `regression`."""

    loss: Literal["cross_entropy", "mse", "huber", "angular"] | None = Field(
        None,
        description="`cross_entropy` (lm_head, classification); `mse`, `huber` or `angular` "
        "(regression). `angular`: the output's 2k values are k angles as sines then cosines, "
        "`[sin a1 .. sin ak, cos a1 .. cos ak]` (or `layout: pairs`), trained against targets laid "
        "out alike by the mean of 1 - cos(predicted - target angle). Default: by the output's kind.",
    )
    weight: Annotated[Real, Field(ge=0, le=1e6)] = Field(
        1.0, description="This output's term in the total loss is `weight * loss`."
    )
    delta: Annotated[Real, Field(gt=0, le=1e6)] | None = Field(
        None, description="`huber` only: where the loss turns from quadratic to linear. Default: 1."
    )
    layout: Literal["halves", "pairs"] | None = Field(
        None,
        description="`angular` only: `halves`, every sine then every cosine (the default); "
        "`pairs`, `(sin, cos)` of each angle in turn.",
    )


class TrainData(SpecModel):
    """The training data: one local file, read by `epicycle train` (see the README's `Training
    data`). A text or a token array serves one tokens input and lm_head outputs; arrays named
    after the spec's inputs and outputs serve any spec."""

    path: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=4096)] = Field(
        description="The data file, relative to this spec's folder: a UTF-8 text, a token array "
        "(`.npy`, `.bin`) or arrays (`.npz`, `.safetensors`, `.parquet`, `.csv`)."
    )
    format: Literal["text", "tokens", "npz", "safetensors", "parquet", "csv"] | None = Field(
        None,
        description="How to read `path`; default: by its suffix (`.npy`/`.bin`: tokens, `.npz`, "
        "`.safetensors`, `.parquet`, `.csv`; any other: text).",
    )
    tokenizer: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=4096)] | None = (
        Field(
            None,
            description="Text only: a `tokenizers` JSON file (relative to this spec's folder) "
            "that turns the text into ids; default: the text's characters are its vocabulary.",
        )
    )
    dtype: Literal["uint16", "uint32"] | None = Field(
        None, description="Raw `.bin` token arrays: the ids' type (default uint16, as nanoGPT's)."
    )
    arrays: Annotated[
        dict[Name, Annotated[str, Strict(), StringConstraints(min_length=1, max_length=256)]],
        Field(max_length=128),
    ] = Field(
        {},
        description="Arrays: which array or column feeds an input or output, `{port: name}`; "
        "default: the one named like the port.",
    )

    @model_validator(mode="after")
    def _formats_agree(self) -> TrainData:
        conflict = declaration_conflict(
            self.path, self.format, self.tokenizer, self.dtype, dict(self.arrays)
        )
        if conflict:
            raise PydanticCustomError("data_format", conflict)
        return self


class Tbptt(SpecModel):
    """Truncated backpropagation through time: how `epicycle train` cuts a time axis into chunks."""

    chunk: Annotated[Int, Field(ge=1, le=1 << 16)] = Field(
        description="Time steps per chunk. Each chunk is one optimizer step: its per-step outputs "
        "are scored against its targets and backpropagated, then the state is carried, detached, "
        "into the next chunk; a sequence of T steps takes ceil(T / chunk) steps."
    )


class Train(SpecModel):
    """How the model is trained: `compiler.tools.training.build_optimizer(model)` reads this section."""

    optimizer: Annotated[Any, ComponentField("optimizer")] | None = Field(
        None,
        description="The optimizer, by `kind`: `adamw`, `sgd`, `fam` (frequency-adaptive momentum) or a "
        "registered one. Default: adamw.",
    )
    schedule: Annotated[Any, ComponentField("schedule")] | None = Field(
        None,
        description="The learning-rate schedule, by `kind`: `constant`, `warmup_cosine` or a registered "
        "one. Default: constant.",
    )
    steps: Annotated[Int, Field(ge=1, le=10**9)] = Field(
        1000, description="Optimizer steps (the schedule's length)."
    )
    batch: Annotated[Int, Field(ge=1, le=1 << 20)] = Field(32, description="Sequences per step.")
    losses: Annotated[dict[Name, OutputLoss], Field(max_length=64)] = Field(
        {},
        description="Per output, by name, its loss and weight; outputs not named train with their "
        "kind's default loss at weight 1. The total loss is the sum of `weight * loss` over the "
        "outputs plus the training terms the spec's parts declare.",
    )
    grad_clip: Annotated[Real, Field(gt=0, le=1e6)] | None = Field(
        1.0, description="Clip the gradients' global norm to this; null: no clipping."
    )
    eval_every: Annotated[Int, Field(ge=1, le=10**9)] = Field(
        100,
        description="`epicycle train`: validation loss and a checkpoint every this many steps "
        "(and at the end).",
    )
    val_fraction: Annotated[Real, Field(gt=0, lt=1)] = Field(
        0.1, description="`epicycle train`: the last fraction of the text held out for validation."
    )
    seed: Annotated[Int, Field(ge=0, lt=1 << 63)] = Field(
        0,
        description="`epicycle train`: seeds the batches drawn and dropout (weights: the spec's `seed`).",
    )
    data: TrainData | None = Field(
        None, description="`epicycle train`: the data file; default: `--data`."
    )
    tbptt: Tbptt | None = Field(
        None,
        description="`epicycle train` on a spec with a time axis (`time:`): truncated "
        "backpropagation through time over chunks of this many steps; default: the whole "
        "sequence is one chunk. Refused on a spec without `time:`.",
    )


# --------------------------------------------------------------------------- the spec


class Spec(SpecModel):
    """An epicycle model: inputs, nodes (sub-models), edges between them, and outputs."""

    spec: Annotated[Int, Field(description="The spec language version; this epicycle reads 1.")]
    name: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=128)]
    seed: Annotated[Int, Field(ge=0, lt=1 << 63)] = Field(
        0, description="Seeds weight initialisation."
    )
    defaults: Defaults = Defaults()
    inputs: Annotated[dict[Name, Input], Field(min_length=1, max_length=64)]
    perspectives: Annotated[dict[Name, Perspective], Field(max_length=256)] = {}
    nodes: Annotated[dict[Name, Node], Field(min_length=1, max_length=MAX_NODES)]
    edges: Annotated[list[Edge], Field(max_length=MAX_EDGES)] = []
    feedback: Feedback | None = None
    time: Time | None = Field(
        None,
        description="A time axis: inputs are sequences of time steps, delayed edges carry the "
        "state from one step to the next, outputs come per step (see `Time`).",
    )
    outputs: Annotated[dict[Name, Output], Field(min_length=1, max_length=64)]
    train: Train = Train()


def json_schema() -> dict[str, Any]:
    """JSON Schema for editors (yaml-language-server): completion, hover docs, live errors."""
    schema = Spec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "epicycle spec, version 1"
    schema["properties"]["spec"]["const"] = SPEC_VERSION
    schema = link_components(schema, [NodeField(), *(ComponentField(f) for f in FAMILIES)])
    return schema
