"""Lattice Oscillator attention (docs/designs.md, design 002): attention heads on an n-dimensional
lattice, each a Kuramoto oscillator coupled to its neighbours, whose phase shapes its scores.

The reading implemented, and why. The authors' code adds `0.1 * cos(phase_h)` to every score of
head `h`: a constant per head, which the softmax cancels, and it advances the phases in a buffer
without gradient, so the coupling never learns. Here the phase term varies over
(query, key) and the phases are differentiable:

    score_h(i, j) = q_i . k_j / sqrt(d_head) + alpha_h * cos(theta_h + nu_h * (i - j))

* `theta_h` is head `h`'s phase after `substeps` Kuramoto updates from a learned initial phase:
  `theta_h += dt * (omega_h + K / |N(h)| * sum_{n in N(h)} exp(-dist(h, n) / lambda) * sin(theta_n - theta_h))`,
  recomputed (and differentiated) every forward pass: a stateless function of the parameters, so a
  model's output depends on its weights and inputs only, and K and lambda receive gradients.
* `nu_h = token_frequency * omega_h` turns the term along the sequence at the head's own
  frequency; `alpha_h` is a learned amplitude.

The phase term is a rank-2 product, `cos(a + b) = cos a cos b - sin a sin b`, so it folds into Q and
K as two extra dimensions (as RoPE folds rotations): no `(tokens x tokens)` bias is ever built and
attention stays one fused `scaled_dot_product_attention` call. The two dimensions are taken from
the head's width (content queries and keys are `d_head - 2` wide, values `d_head`), so the kernel
sees the head width the spec asked for.

In eager mode the small work around the projections (the Kuramoto chain, the phase features, the
slot layout of the projection's rows: ~200 kernels forward and backward) is one pure function,
`slot_terms`, of the parameters and of sizes only, never of the input. A GPU therefore replays it
as two CUDA graphs, forward and backward, captured once per size (`GraphedSlotTerms`, the layer's
`region = "graphs"`), or runs it as one compiled region (`region = "compiled"`). In both, and
inside a compiled model, the chain and the phase pairs are fused Triton kernels
(`kuramoto_kernel`: one launch forward, two backward). Its eager ops (`region = "reference"`,
and always on the CPU; `kuramoto.py` holds the oscillators' own) are the reference all of these
are tested against (`fused_slot_terms`). In evaluation mode the chain takes `eval_substeps`
updates where set (AKOrN, Miyato et al., ICLR 2025: more oscillator steps at test time).

`LatticeAttention` is that attention sub-layer, registered as the `lattice` attention component;
a `runtime.transformer.Block` builds it like any other attention choice.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.attention import kuramoto_kernel
from runtime.attention.kuramoto import (  # noqa: F401 (re-exported)
    coupling_weights,
    kuramoto_phases,
    phase_angles,
    phase_features,
)
from runtime.configs import PHASE_DIMS, LatticeConfig  # noqa: F401 (re-exported)
from runtime.layers import MemberLinear, scaled_init_


def lattice_distances(cfg: LatticeConfig) -> Tensor:
    """`(cells, cells)` distances between neighbouring cells (row-major numbering), `inf` elsewhere."""
    coords = list(itertools.product(*(range(n) for n in cfg.shape)))
    sizes = torch.tensor(cfg.shape, dtype=torch.float64)
    points = torch.tensor(coords, dtype=torch.float64).reshape(-1, len(cfg.shape))
    delta = (points[:, None, :] - points[None, :, :]).abs()
    if cfg.boundary == "periodic":
        delta = torch.minimum(delta, sizes - delta)
    distance = delta.pow(2).sum(-1).sqrt()
    if cfg.radius is not None:
        near = distance <= cfg.radius + 1e-9
    elif cfg.neighbourhood == "von_neumann":
        near = delta.sum(-1) == 1
    else:
        near = delta.max(-1).values <= 1
    near &= distance > 0
    return torch.where(near, distance, torch.full_like(distance, math.inf)).float()


def slot_terms(
    weight: Tensor,
    bias: Tensor | None,
    oscillators: tuple[Tensor, ...],
    heads: int,
    content_width: int,
    tokens: int,
    dt: float,
    substeps: int,
    token_frequency: float,
    kernel: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Everything a lattice layer computes besides its projections and attention, as one pure
    function: the query/key projection rows laid out with a zero row at each phase slot, the
    Kuramoto chain, and the phase pairs `(members, tokens, 2 * heads, 2)` (query heads, then key
    heads) that go into the slots. `oscillators` is `(initial_phase, omega, coupling, log_range,
    strength, distance, neighbour)`. Returns `(weight, bias, pairs, theta)`.

    As eager ops the chain and the pairs are ~200 small kernels (forward and backward) around
    three big ones; `kernel` computes them by the fused Triton kernels instead (one launch
    forward, two backward: `kuramoto_kernel.lattice_phase_pairs`) where they can run (a CUDA
    tensor, Triton, at most `MAX_CELLS` cells), which is how the fast regions run this function
    (`fused_slot_terms`). These eager ops are the reference both are tested against."""
    initial_phase, omega, coupling, log_range, strength, distance, neighbour = oscillators
    head_width = content_width + PHASE_DIMS
    if kernel and _kernel_runs(initial_phase):
        sizes = (dt, substeps, token_frequency, tokens, head_width)
        pairs, theta = kuramoto_kernel.lattice_phase_pairs(*oscillators, *sizes)
    else:
        theta = kuramoto_phases(
            initial_phase, omega, coupling, log_range, distance, neighbour, dt, substeps
        )
        query, key = phase_features(theta, omega, strength, token_frequency, tokens, head_width)
        theta = theta.to(initial_phase.dtype)
        pairs = torch.cat((query, key), 1).transpose(1, 2)  # (members, tokens, 2 * heads, 2)
    rows = 2 * heads * content_width  # query and key rows; the value rows follow
    slotted = _with_slots(weight[..., :rows, :], 2 * heads, content_width, dim=-2)
    weight = torch.cat((slotted, weight[..., rows:, :]), -2)
    if bias is not None:
        slotted = _with_slots(bias[..., :rows], 2 * heads, content_width, dim=-1)
        bias = torch.cat((slotted, bias[..., rows:]), -1)
    return weight, bias, pairs, theta


def _kernel_runs(initial_phase: Tensor) -> bool:
    """Whether the fused Kuramoto kernels take these phases: a CUDA tensor with Triton importable
    and a lattice of at most `kuramoto_kernel.MAX_CELLS` cells (larger ones use the eager ops)."""
    return (
        initial_phase.is_cuda
        and kuramoto_kernel.triton is not None
        and initial_phase.shape[-1] <= kuramoto_kernel.MAX_CELLS
    )


REGIONS = ("graphs", "compiled", "reference")
"""How an eager layer on a GPU runs `slot_terms`: replayed CUDA graphs, one compiled region, or
the reference ops (`fused_slot_terms`)."""


@functools.cache
def _compiled_slot_terms():
    return torch.compile(functools.partial(slot_terms, kernel=True), fullgraph=True)


def fused_slot_terms(*args, region: str = "compiled", owner: nn.Module | None = None):
    """`slot_terms` as `region` runs it when its tensors are on a GPU and the caller is eager:
    `"graphs"`, CUDA graphs captured for `owner` and replayed (`graphed_slot_terms`; where they
    cannot be used, with a warning: the reference ops during another capture, which records them,
    else the compiled region); `"compiled"`, one inductor region; `"reference"`, the eager ops.
    On the CPU (where a compile per shape costs more than it saves) and inside a compiled model
    (which traces it with the rest), the reference ops whatever `region` says."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}; got {region!r}")
    if not args[0].is_cuda or region == "reference":
        return slot_terms(*args)
    if torch.compiler.is_compiling():  # traced with the model, the kernels launched by inductor
        return slot_terms(*args, kernel=True)
    if region == "graphs":
        if owner is None:
            raise ValueError("region 'graphs' keeps its captures per layer: pass owner=")
        result = graphed_slot_terms(owner, *args)
        if result is not None:
            return result
        region = graphs_fallback()
    return slot_terms(*args) if region == "reference" else _compiled_slot_terms()(*args)


def _eager_on_a_gpu(x: Tensor) -> bool:
    """Where a layer's pass may replay CUDA graphs (the tests stand graphs in on the CPU)."""
    return x.is_cuda


def graphs_fallback() -> str:
    """The region that runs where graphs cannot: the reference ops during another capture (which
    records them), else the compiled region."""
    return "reference" if torch.cuda.is_current_stream_capturing() else "compiled"


_GRAPH_WARMUPS = 3  # eager runs on a side stream before a capture (lazy initialisation)
_MAX_RECAPTURES = 4  # per layer: parameters that keep moving make graphs cost more than they save
_MAX_CAPTURES = 8  # per layer: each length (and mode) holds its own outputs and gradients
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _LayerGraphs


class GraphedSlotTerms:
    """`slot_terms` captured as two CUDA graphs for one set of input tensors and sizes: the forward
    pass (the Kuramoto chain, the phase pairs and the slotted weight: one graph launch instead of
    a compiled region's guards, wrappers and kernel launches) and, when a parameter needs a
    gradient, the backward pass.

    The forward graph reads the parameters in place, by address: an optimizer step and
    `load_state_dict` (which copy into the same memory) are seen by the next replay; a parameter
    re-assigned or converted (`.to()`, `p.data = ...`) has another address, which `matches` tells
    before each replay, and `graphed_slot_terms` captures anew. The backward graph reads graph
    memory only (the chain runs on copies of the oscillator tensors made inside the forward
    graph; the slot layout's backward reads no weights), so parameters whose memory moves between
    a forward and its backward (FSDP resharding) do no harm. The outputs are graph memory,
    rewritten by the next replay with the same values as long as the parameters have not changed
    in between (two passes through one layer before one backward, gradient accumulation: both
    fine; an optimizer step between a forward and its backward: not). Gradients leave the backward graph as fresh tensors (one copy
    per dtype, split into views): `torch.cuda.make_graphed_callables` hands autograd its graph's
    own gradient memory, which `AccumulateGrad` keeps as `.grad` and the next replay overwrites,
    so accumulating two backward passes into `.grad` from `None` doubles the second; that is why
    it is not used here. A parameter reached only through an output nothing uses gets a zero
    gradient (not None). `theta` is returned detached: the layer records it and nothing
    differentiates it."""

    def __init__(self, tensors: tuple[Tensor | None, ...], sizes: tuple, train: bool):
        self.sizes, self.signature = sizes, _signature(tensors)
        inputs = tuple(t for t in tensors if t is not None and t.requires_grad)
        self.gradient_layout = tuple((t.dtype, t.shape) for t in inputs)
        self.train = train and bool(inputs)
        self.backward_graph = None
        weight, bias, *oscillators = tensors

        def run() -> tuple:
            return slot_terms_on_copies(weight, bias, tuple(oscillators), *sizes)

        def gradients(outputs: tuple[Tensor, ...], grad_outputs, capture: bool) -> list[Tensor]:
            if not self.train:
                return []
            # retain_graph: the forward graph's saved tensors keep their memory through the
            # backward capture, or its buffers could take it and a second backward of one forward
            # replay (two passes through one layer) would read them overwritten
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=capture, allow_unused=True
            )
            return [
                torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)
            ]

        with (
            torch.cuda.device(weight.device),
            _autocast_without_cache(),
            torch.set_grad_enabled(self.train),
        ):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_GRAPH_WARMUPS):
                    outputs = self._differentiable(run())
                    gradients(outputs, [torch.empty_like(o) for o in outputs], capture=False)
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            self.forward_graph, (weight_out, bias_out, pairs, theta) = capture_graph(run, pool)
            self.bias_given = bias_out is not None
            self.outputs = self._differentiable((weight_out, bias_out, pairs))
            self.theta = theta.detach()
            if self.train:
                self.grad_outputs = tuple(torch.empty_like(o) for o in self.outputs)
                self.backward_graph, self.flat = capture_graph(
                    lambda: _flat_by_dtype(gradients(self.outputs, self.grad_outputs, True)), pool
                )

    @staticmethod
    def _differentiable(outputs: tuple) -> tuple[Tensor, ...]:
        return tuple(o for o in outputs[:3] if o is not None)

    def matches(self, tensors: tuple[Tensor | None, ...]) -> bool:
        """Whether `tensors` are where the capture reads: same addresses, layouts, gradient needs."""
        return _signature(tensors) == self.signature

    def __call__(self, tensors: tuple[Tensor | None, ...]) -> tuple:
        """The replayed `(weight, bias, pairs, theta)`, differentiable in `tensors` (which
        `matches`; autograd links the outputs to these objects, not to the captured ones)."""
        if self.train and torch.is_grad_enabled():
            inputs = (t for t in tensors if t is not None and t.requires_grad)
            outputs = _ReplaySlotTerms.apply(self, *inputs)
        else:
            self.forward_graph.replay()
            outputs = tuple(o.detach() for o in self.outputs)
        weight, *rest = outputs
        bias = rest.pop(0) if self.bias_given else None
        return weight, bias, rest[0], self.theta

    def input_gradients(self, grads: tuple[Tensor, ...]) -> list[Tensor]:
        """Replay the backward graph on `grads` (copied into its inputs) and return fresh gradients
        of the inputs that need one."""
        for static, grad in zip(self.grad_outputs, grads, strict=True):
            if static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        return self.replay_backward()

    def replay_backward(self) -> list[Tensor]:
        """Fresh gradients of the inputs that need one, from the backward graph replayed on what
        `grad_outputs` (the outputs' gradients, in order) hold now."""
        self.backward_graph.replay()
        fresh = {dtype: flat.clone() for dtype, flat in self.flat.items()}
        return _unflatten_by_dtype(fresh, self.gradient_layout)


def slot_terms_on_copies(weight: Tensor, bias: Tensor | None, oscillators: tuple, *sizes):
    """`slot_terms` with the oscillator tensors copied first: what autograd saves for the backward
    is then these copies and intermediates, never a parameter's or buffer's memory (the slot
    layout's backward reads no weights), so a captured backward reads only graph memory."""
    return slot_terms(weight, bias, tuple(t.clone() for t in oscillators), *sizes, kernel=True)


class _ReplaySlotTerms(torch.autograd.Function):
    """One autograd node around a `GraphedSlotTerms`' forward and backward replays."""

    @staticmethod
    def forward(ctx, graphs: GraphedSlotTerms, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.graphs = graphs
        graphs.forward_graph.replay()
        return tuple(o.detach() for o in graphs.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *ctx.graphs.input_gradients(grads))


class _GraphedProjection(torch.autograd.Function):
    """A training pass's query/key/value projection on the graphs path as one autograd node: the
    forward graph's replay (slotted weight, bias, phase pairs), the projection of `x`, and the add
    of the pairs into the slots; backward, the projection's gradients written straight into the
    backward graph's gradient inputs, then its replay. Three nodes before (the replay, the
    linear, the add) cost a 2k-token layer, which waits on its host, a Python call, autograd's
    bookkeeping and a copy into the graph's inputs each. The slotted weight is graph memory: the
    backward reads it where the replay left it, which holds while the parameters keep their
    values between a forward and its backward (as `GraphedSlotTerms` says)."""

    @staticmethod
    def forward(
        ctx, graphs: GraphedSlotTerms, x: Tensor, heads: tuple, content_width: int, *inputs: Tensor
    ) -> Tensor:
        graphs.forward_graph.replay()
        weight, *rest = graphs.outputs
        qkv = project(x, weight, rest[0] if graphs.bias_given else None, heads[0])
        _query_key_slots(qkv, heads, content_width).add_(rest[-1][:, None])
        ctx.graphs, ctx.heads, ctx.content_width = graphs, heads, content_width
        ctx.save_for_backward(x)
        return qkv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        graphs, members = ctx.graphs, ctx.heads[0]
        weight = graphs.outputs[0]
        rows = weight.shape[-2]
        flat_grad = grad.reshape(members, -1, rows)
        grad_x = None
        if ctx.needs_input_grad[1]:
            flat_weight = weight.to(grad.dtype).reshape(members, rows, -1)
            grad_x = torch.bmm(flat_grad, flat_weight).reshape(x.shape).to(x.dtype)
        statics = graphs.grad_outputs  # the slotted weight's, the bias's, the pairs' gradients
        flat_x = x.reshape(members, -1, x.shape[-1]).to(grad.dtype)
        weight_grad = statics[0].view(members, rows, -1)
        if weight_grad.dtype == grad.dtype:  # straight into the graph's input
            torch.bmm(flat_grad.transpose(1, 2), flat_x, out=weight_grad)
        else:  # mixed precision: bf16 activations, fp32 parameters
            weight_grad.copy_(torch.bmm(flat_grad.transpose(1, 2), flat_x))
        if graphs.bias_given:
            torch.sum(flat_grad, 1, dtype=statics[1].dtype, out=statics[1].view(members, rows))
        slots = _query_key_slots(grad, ctx.heads, ctx.content_width)
        torch.sum(slots, 1, dtype=statics[-1].dtype, out=statics[-1])
        return (None, grad_x, None, None, *graphs.replay_backward())


def project(x: Tensor, weight: Tensor, bias: Tensor | None, members: int) -> Tensor:
    """`(members, batch * tokens, rows)`: `x @ weight.T + bias` per member, one batched product
    whatever `members` is. Its result is not a view (`F.linear` returns one for 3-d inputs), so
    RoPE may turn it in place even where an autograd Function made it (`_GraphedProjection`)."""
    rows = weight.shape[-2]
    flat_x = x.reshape(members, -1, x.shape[-1])
    flat_weight = weight.view(members, rows, -1).transpose(1, 2)
    if bias is None:
        return torch.bmm(flat_x, flat_weight)
    return torch.baddbmm(bias.view(members, 1, rows), flat_x, flat_weight)


def graphed_projection(graphs: GraphedSlotTerms, x: Tensor, heads: tuple, *args) -> Tensor:
    """The projection of `x` with the phase pairs in its slots, `slot_terms(*args)` replayed from
    `graphs` (which match `args` and are for training) in one autograd node."""
    weight, bias, oscillators, _, content_width, *_ = args
    inputs = [t for t in (weight, bias, *oscillators) if t is not None and t.requires_grad]
    return _GraphedProjection.apply(graphs, x, heads, content_width, *inputs)


def capture_graph(run: Callable[[], Any], pool) -> tuple[Any, Any]:
    """`(graph, outputs)`: `run()` captured on torch's capture stream into memory pool `pool`.
    `thread_local`: other threads (a data loader pinning memory) may go on using CUDA meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = run()
    return graph, outputs


def _flat_by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, Tensor]:
    dtypes = dict.fromkeys(t.dtype for t in tensors)
    return {d: torch.cat([t.reshape(-1) for t in tensors if t.dtype == d]) for d in dtypes}


def _unflatten_by_dtype(
    flat: dict[torch.dtype, Tensor], layout: tuple[tuple[torch.dtype, torch.Size], ...]
) -> list[Tensor]:
    """Views of `flat`'s buffers with `layout`'s dtypes and shapes: `AccumulateGrad` takes them as
    `.grad` without a copy (one buffer per dtype backs a layer's gradients, as a DDP bucket view
    does)."""
    pieces = {
        d: iter(buffer.split([shape.numel() for dtype, shape in layout if dtype == d]))
        for d, buffer in flat.items()
    }
    return [next(pieces[dtype]).view(shape) for dtype, shape in layout]


def _signature(tensors: tuple[Tensor | None, ...]) -> tuple:
    return tuple(
        None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.requires_grad)
        for t in tensors
    )


@contextlib.contextmanager
def _autocast_without_cache() -> Iterator[None]:
    """The caller's CUDA autocast state with its weight-cast cache off: a cast cached during a
    capture would live in graph memory (`make_graphed_callables` refuses the cache for this)."""
    enabled = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
        yield


class _LayerGraphs:
    """One layer's captures, by sizes and autograd/autocast state, and how often they went stale."""

    def __init__(self):
        self.captures: dict[tuple, GraphedSlotTerms] = {}
        self.recaptures = 0
        self.off: str | None = None  # why graphs stay off for this layer from now on


def release_graphs(owner: nn.Module) -> None:
    """Drop the CUDA graphs captured for `owner` (a lattice layer), and the memory they hold: its
    outputs, gradients and saved tensors. The next eager pass on a GPU captures anew."""
    _GRAPHS.pop(owner, None)


def graph_unavailable_reason(tensors: tuple[Tensor | None, ...]) -> str | None:
    """Why `slot_terms` on `tensors` cannot be captured now (None: it can)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "another CUDA graph capture is under way: its eager ops are recorded into it"
    if any(t is not None and type(t) not in (Tensor, nn.Parameter) for t in tensors):
        return "a parameter is a tensor subclass (DTensor, FSDP) without a fixed address"
    if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return "the layer runs under a torch.func transform (vmap, grad)"
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return "saved-tensor hooks are active (activation checkpointing or offloading)"
    return None


def graphed_slot_terms(owner: nn.Module, *args) -> tuple | None:
    """`slot_terms(*args)` replayed from CUDA graphs captured for `owner` (`slot_terms_graphs`),
    or None (with a warning) where graphs cannot be used."""
    graphs = slot_terms_graphs(owner, *args)
    weight, bias, oscillators, *_ = args
    return None if graphs is None else graphs((weight, bias, *oscillators))


def slot_terms_graphs(owner: nn.Module, *args) -> GraphedSlotTerms | None:
    """The CUDA graphs of `slot_terms(*args)` kept for `owner`: one capture per sizes, gradient
    mode and autocast state, made anew where `owner`'s parameters moved. None, with a warning
    saying why, where graphs cannot be used: during another capture, for tensor subclasses, under
    torch.func transforms or saved-tensor hooks, for a new length once a layer holds
    `_MAX_CAPTURES` captures (each holds its outputs and gradient buffers: a loop over growing
    lengths would hold one per length), and, from then on, for a layer whose parameters moved a
    `_MAX_RECAPTURES + 1`-th time or whose capture raised."""
    weight, bias, oscillators, *sizes = args
    tensors = (weight, bias, *oscillators)
    layer = _GRAPHS.get(owner)
    if layer is None:
        layer = _GRAPHS[owner] = _LayerGraphs()
    reason = graph_unavailable_reason(tensors) or layer.off
    if reason is None:
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        key = (tuple(sizes), torch.is_grad_enabled(), autocast)
        graphs = layer.captures.get(key)
        if graphs is not None and not graphs.matches(tensors):
            layer.recaptures += 1  # every capture of the old memory goes, which frees it
            layer.captures = {k: g for k, g in layer.captures.items() if g.matches(tensors)}
            graphs = None
        if graphs is not None:
            return graphs
        if layer.recaptures > _MAX_RECAPTURES:
            reason = layer.off = f"its parameters moved {layer.recaptures} times: every call?"
        elif len(layer.captures) >= _MAX_CAPTURES:
            reason = f"the layer holds {_MAX_CAPTURES} captures already, one per length and mode"
    if reason is None:
        try:
            graphs = layer.captures[key] = GraphedSlotTerms(tensors, key[0], key[1])
            return graphs
        except RuntimeError as error:  # an operation CUDA cannot capture, out of memory
            layer.captures.pop(key, None)
            reason = layer.off = f"the capture raised {error}"
    warnings.warn(
        f"lattice attention: slot_terms not replayed from CUDA graphs ({reason})",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


class LatticeOscillators(nn.Module):
    """The phases of one attention layer's heads, `members` independent lattices at once."""

    def __init__(self, cfg: LatticeConfig, members: int = 1):
        super().__init__()
        self.cfg = cfg
        heads = cfg.cells
        distance = lattice_distances(cfg) if not _meta() else torch.empty(heads, heads)
        # finite distances and a mask: exp(-inf / range) has a NaN gradient in `range`
        self.register_buffer("neighbour", distance.isfinite(), persistent=False)
        self.register_buffer(
            "distance",
            distance.nan_to_num(posinf=0.0) if not _meta() else distance,
            persistent=False,
        )
        low, high = cfg.frequency_range
        omega = torch.empty(members, heads)
        phase = torch.empty(members, heads)
        if not omega.is_meta:
            omega.uniform_(low, high)
            phase.uniform_(0, 2 * math.pi)
        if cfg.frequencies == "learned":
            self.omega = nn.Parameter(omega)
        else:
            self.register_buffer("omega", omega)
        self.initial_phase = nn.Parameter(phase)
        self.coupling = nn.Parameter(torch.full((members, 1), float(cfg.coupling)))
        self.log_range = nn.Parameter(torch.full((members, 1, 1), math.log(cfg.range)))
        self.strength = nn.Parameter(torch.full((members, heads), float(cfg.strength)))
        self.last_phase: Tensor | None = None  # detached, for metrics
        self.last_entropy: Tensor | None = None  # per head, when `record_entropy` is set
        self.record_entropy = False

    def oscillator_tensors(self) -> tuple[Tensor, ...]:
        """What `slot_terms` reads of this layer, in its order."""
        return (
            self.initial_phase,
            self.omega,
            self.coupling,
            self.log_range,
            self.strength,
            self.distance,
            self.neighbour,
        )

    def weights(self) -> Tensor:
        """`(members, heads, heads)` coupling weights `exp(-distance / range)` (0 off the neighbourhood)."""
        return coupling_weights(self.distance, self.neighbour, self.log_range)

    @property
    def substeps(self) -> int:
        """Kuramoto updates this pass takes: `eval_substeps` in eval mode (AKOrN, Miyato et al.
        2025: more oscillator steps at test time than in training), else `substeps`."""
        cfg = self.cfg
        if not self.training and cfg.eval_substeps is not None:
            return cfg.eval_substeps
        return cfg.substeps

    def phases(self) -> Tensor:
        """`(members, heads)` phases after `substeps` Kuramoto updates from the initial phases."""
        theta = kuramoto_phases(
            self.initial_phase,
            self.omega,
            self.coupling,
            self.log_range,
            self.distance,
            self.neighbour,
            self.cfg.dt,
            self.substeps,
        )
        if not torch.compiler.is_compiling():
            self.last_phase = theta.detach()
        return theta

    def phase_features(
        self, tokens: int, head_width: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Query and key features `(members, heads, tokens, 2)` whose dot product, under SDPA's
        `1/sqrt(head_width)` scaling, is `strength * cos(theta + nu * (i - j))`."""
        cfg = self.cfg
        q, k = phase_features(
            self.phases(), self.omega, self.strength, cfg.token_frequency, tokens, head_width
        )
        return q.to(dtype), k.to(dtype)

    def order_parameter(self, theta: Tensor | None = None) -> Tensor:
        """Kuramoto's `r = |mean_h exp(i theta_h)|` per member (1: in sync, ~0: incoherent)."""
        theta = self.phases() if theta is None else theta
        return torch.sqrt(theta.cos().mean(-1) ** 2 + theta.sin().mean(-1) ** 2)

    def coupling_force(self, theta: Tensor | None = None) -> Tensor:
        """`(members, heads)`: each head's pull `K/|N| * sum_n w * sin(theta_n - theta_h)`."""
        theta = self.phases() if theta is None else theta
        pull = (self.weights() * torch.sin(theta[:, None, :] - theta[:, :, None])).sum(-1)
        return self.coupling * pull / self.neighbour.sum(-1).clamp_min(1)

    def coherence(self, theta: Tensor | None = None) -> Tensor:
        """Spatial incoherence per member: the coupling-weighted mean of `1 - cos(theta_n - theta_h)`
        over neighbouring pairs (0: a smooth phase field)."""
        theta = self.phases() if theta is None else theta
        weights = self.weights()
        gap = 1 - torch.cos(theta[:, None, :] - theta[:, :, None])
        return (weights * gap).sum((-1, -2)) / weights.sum((-1, -2)).clamp_min(1e-12)

    def regularisation(self, step: int) -> dict[str, Tensor]:
        """This layer's weighted training terms at training step `step`."""
        cfg, theta = self.cfg, self.phases()
        terms = {}
        if cfg.phase_weight:
            r = self.order_parameter(theta).mean()
            value = 1 - r if cfg.phase_target == "synchrony" else r
            terms["phase"] = cfg.phase_weight * schedule_factor(*cfg.phase_schedule, step) * value
        if cfg.coherence_weight:
            factor = schedule_factor(*cfg.coherence_schedule, step)
            terms["coherence"] = cfg.coherence_weight * factor * self.coherence(theta).mean()
        return terms


class LatticeAttention(nn.Module):
    """Self-attention over heads on a lattice: `softmax(q.k / sqrt(d_head) + phase term) v`, the
    phase term of each head coming from its oscillator (`LatticeOscillators`), one head per cell.

    Queries and keys have `d_head - 2` content dimensions (rotated by RoPE, if given) and the two
    phase dimensions, whose dot product is the phase term; values are content at full head width.
    Attention stays one `scaled_dot_product_attention` call at the head width the spec asked for.
    """

    def __init__(
        self,
        layout: LatticeConfig,
        width: int,
        heads: int,
        layers: int,
        members: int = 1,
        kv_heads: int | None = None,
        causal: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if layout.cells != heads or kv_heads not in (None, heads):
            raise ValueError(
                f"a lattice of {layout.cells} cells has one query and one key-value head per cell; "
                f"got {heads} heads and {kv_heads} key-value heads"
            )
        self.members, self.heads, self.causal, self.dropout = members, heads, causal, dropout
        self.head_width = width // heads
        self.content_width = self.head_width - PHASE_DIMS
        h, hw, cw = heads, self.head_width, self.content_width
        self.qkv = MemberLinear(members, width, 2 * h * cw + h * hw, bias)
        self.proj = MemberLinear(members, h * hw, width, bias)
        scaled_init_(self.proj, layers)
        self.lattice = LatticeOscillators(layout, members)
        self.region = "graphs"  # how an eager GPU pass runs `slot_terms`: one of `REGIONS`

    @property
    def fused_region(self) -> bool:
        """The earlier switch: True for a fast region (now `region = "graphs"`), False for the
        reference ops."""
        return self.region != "reference"

    @fused_region.setter
    def fused_region(self, fused: bool) -> None:
        self.region = "graphs" if fused else "reference"

    def forward(self, x: Tensor, rotary: nn.Module | None) -> Tensor:
        *lead, n, _ = x.shape
        if rotary is None or getattr(rotary, "padded_to", None) == self.head_width:
            q, k, v = self._slotted_qkv(x, rotary)
        else:
            q, k, v = self._concatenated_qkv(x, rotary)
        if self.lattice.record_entropy and not torch.compiler.is_compiling():
            self.lattice.last_entropy = _attention_entropy(q[0], k[0], self.causal)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(*lead, n, self.heads * self.head_width))

    def _slotted_qkv(self, x: Tensor, rotary: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """Each query and key head is laid out `[content half, cos slot, content half, sin slot]`:
        the projection's rows get a zero row at each slot, so one matmul writes whole aligned
        heads, the phase pairs are added into the slots in place (q, k and v stay views of one
        projection, so the layer holds what plain attention holds), and RoPE (whose tables,
        `padded_to` the head width, leave the slot pair unrotated) turns the content pairs in
        the same pass. Concatenating two dimensions to `d_head - 2`-wide heads instead (the
        first version) made every copy of q, k and of their gradients unaligned; a registered
        rotary component, which knows nothing of slots, takes that path (`_concatenated_qkv`)."""
        h, hw, cw = self.heads, self.head_width, self.content_width
        n = x.shape[-2]
        lattice, compiling = self.lattice, torch.compiler.is_compiling()
        args = (
            self.qkv.weight,
            self.qkv.bias,
            lattice.oscillator_tensors(),
            h,
            cw,
            n,
            lattice.cfg.dt,
            lattice.substeps,
            lattice.cfg.token_frequency,
        )
        heads = (self.members, -1, n, 3 * h, hw)  # (members, batch, tokens, 3h, hw)
        region, graphs = self.region, None
        if region == "graphs" and _eager_on_a_gpu(x) and not compiling:
            graphs = slot_terms_graphs(self, *args)  # None: it warned why
            region = "graphs" if graphs is not None else graphs_fallback()
        fused = graphs is not None and graphs.train and torch.is_grad_enabled()
        if fused:  # the pairs are in; RoPE leaves the slots as they are
            qkv, theta = graphed_projection(graphs, x, heads, *args), graphs.theta
        else:
            if graphs is not None:
                weight, bias, pairs, theta = graphs((args[0], args[1], *args[2]))
            else:
                weight, bias, pairs, theta = fused_slot_terms(*args, region=region, owner=self)
            qkv = project(x, weight, bias, self.members)
        if not compiling:
            lattice.last_phase = theta.detach()
        if rotary is not None:
            qk = qkv.view(heads)[..., : 2 * h, :]
            qk.copy_(rotary.rotate_token_major(qk))
        if not fused and compiling:  # functionalised: the compiler fuses the add anyway
            _phase_slots(qkv.view(heads)[..., : 2 * h, :], cw).add_(pairs[:, None])
        elif not fused:
            qkv = _AddPhasePairs.apply(qkv, pairs, heads, cw)
        return qkv.view(heads).flatten(0, 1).transpose(1, 2).split((h, h, h), dim=1)

    def _concatenated_qkv(self, x: Tensor, rotary: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Content queries and keys `d_head - 2` wide, rotated by a registered rotary component,
        each extended by the two phase dimensions; values keep the full head width."""
        h, hw, cw = self.heads, self.head_width, self.content_width
        n = x.shape[-2]
        q, k, v = self.qkv(x).split((h * cw, h * cw, h * hw), dim=-1)
        q = rotary(q.reshape(-1, n, h, cw).transpose(1, 2))
        k = rotary(k.reshape(-1, n, h, cw).transpose(1, 2))
        v = v.reshape(-1, n, h, hw).transpose(1, 2)
        phase_q, phase_k = self.lattice.phase_features(n, hw, q.dtype)  # (members, heads, n, 2)
        batch = q.shape[0] // self.members
        expand = (self.members, batch, h, n, PHASE_DIMS)
        phase_q = phase_q[:, None].expand(expand).reshape(-1, h, n, PHASE_DIMS)
        phase_k = phase_k[:, None].expand(expand).reshape(-1, h, n, PHASE_DIMS)
        return torch.cat((q, phase_q), -1), torch.cat((k, phase_k), -1), v


def _with_slots(values: Tensor, heads: int, content_width: int, dim: int) -> Tensor:
    """Lay `heads` groups of `content_width` entries along `dim` of `values` out as lattice heads
    with a zero at each of the two phase slots: each half of a head ends in one slot,
    `[c_0..c_{m-1}, slot, c_m..c_{2m-1}, slot]`, the layout in which RoPE's halves pair the two
    slots with each other (an odd content width puts both at the end)."""
    x = values.movedim(dim, -1).unflatten(-1, (heads, -1))
    if content_width % 2 == 0:
        x = F.pad(x.unflatten(-1, (2, -1)), (0, 1)).flatten(-2)
    else:
        x = F.pad(x, (0, PHASE_DIMS))
    return x.flatten(-2).movedim(-1, dim)


class _AddPhasePairs(torch.autograd.Function):
    """The projection `qkv` (not a view) with the phase pairs `(members, tokens, 2h, 2)` added into
    its query and key slots in place, as one autograd node: `qkv`'s gradient passes through
    unchanged and `pairs`' is the slots' gradient summed over the batch. The same add through a
    view of `qkv` costs eager autograd a copy of the whole projection's gradient (`CopySlices`)
    and a zero-filled, projection-sized gradient for each view taken after it: ~10 kernels
    and as many passes over the projection in each backward."""

    @staticmethod
    def forward(ctx, qkv: Tensor, pairs: Tensor, heads: tuple, content_width: int) -> Tensor:
        ctx.heads, ctx.content_width, ctx.pairs_dtype = heads, content_width, pairs.dtype
        _query_key_slots(qkv, heads, content_width).add_(pairs[:, None])
        ctx.mark_dirty(qkv)
        return qkv

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        if not ctx.needs_input_grad[1]:
            return grad, None, None, None
        slots = _query_key_slots(grad, ctx.heads, ctx.content_width)
        return grad, slots.sum(1).to(ctx.pairs_dtype), None, None


def _query_key_slots(qkv: Tensor, heads: tuple, content_width: int) -> Tensor:
    """The `(members, batch, tokens, 2h, 2)` view of the phase slots of `qkv`'s query and key
    heads, `heads` being `qkv`'s `(members, batch, tokens, 3h, hw)` shape."""
    return _phase_slots(qkv.reshape(heads)[..., : 2 * (heads[3] // 3), :], content_width)


def _phase_slots(heads: Tensor, content_width: int) -> Tensor:
    """The `(..., 2)` view of the (cos, sin) slots of lattice heads laid out by `_with_slots`."""
    if content_width % 2 == 0:
        return heads.unflatten(-1, (2, -1))[..., -1]
    return heads[..., content_width:]


@torch.no_grad()
def _attention_entropy(q: Tensor, k: Tensor, causal: bool, tokens: int = 256) -> Tensor:
    """Per head, the mean entropy (nats) of one sequence's attention rows over its first `tokens`
    tokens: a metric probe, computed densely on a small window only."""
    q, k = q[:, :tokens].float(), k[:, :tokens].float()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    p = scores.softmax(-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)


def schedule_factor(kind: str, steps: int, step: int) -> float:
    """A regulariser's weight multiplier at `step`: constant, warm-up, linear or cosine decay."""
    progress = min(max(step, 0), steps) / steps
    if kind == "warmup":
        return progress
    if kind == "anneal":
        return 1 - progress
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def lattice_layers(model: nn.Module) -> list[tuple[str, LatticeOscillators]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LatticeOscillators)]


def lattice_regularisation(model: nn.Module, step: int) -> Tensor:
    """The sum of every lattice layer's weighted training terms (the spec's `training:` weights and
    schedules); add it to the task loss."""
    total = None
    for _, layer in lattice_layers(model):
        for value in layer.regularisation(step).values():
            total = value if total is None else total + value
    if total is None:
        total = next(model.parameters()).new_zeros(())
    return total


@contextlib.contextmanager
def phase_term_off(model: nn.Module) -> Iterator[nn.Module]:
    """The lattice-off ablation (the `lot` project's): inside the block every lattice layer's
    phase-term gain `strength` is 0, so heads attend by content alone with the same weights;
    the gains come back on leaving it."""
    layers = [layer for _, layer in lattice_layers(model)]
    saved = [layer.strength.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.strength.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, strength in zip(layers, saved, strict=True):
                layer.strength.copy_(strength)


@torch.no_grad()
def layer_report(layer: LatticeOscillators, member: int | None = None) -> dict[str, Any]:
    """One lattice layer's numbers, as `GraphModel.report()` gives them (and so metrics.jsonl and
    TensorBoard, one scalar per number): the Kuramoto order parameter, mean |coupling force|,
    spatial incoherence, coupling, range and (after a pass with `record_entropy` set) the mean
    attention entropy; and `heads`, per head: phase (wrapped to [-pi, pi)), coupling force,
    intrinsic frequency, phase-term gain and attention entropy. `member`: one member of a batched
    layer; None: the scalars averaged over members (per-head values only for a single member)."""
    theta = layer.phases()
    force = layer.coupling_force(theta)
    scalars = {
        "order_parameter": layer.order_parameter(theta),
        "coupling_force": force.abs().mean(-1),
        "incoherence": layer.coherence(theta),
        "coupling": layer.coupling.mean(-1),
        "range": layer.log_range.exp().flatten(1).mean(-1),
    }
    pick = (lambda v: v.mean()) if member is None else (lambda v: v[member])
    entry: dict[str, Any] = {name: float(pick(value)) for name, value in scalars.items()}
    entropy = layer.last_entropy  # recorded for the first member only
    if entropy is not None and member in (None, 0):
        entry["attention_entropy"] = float(entropy.mean())
    if member is None and theta.shape[0] > 1:
        return entry
    m = member or 0
    wrapped = torch.remainder(theta[m] + math.pi, 2 * math.pi) - math.pi
    heads = {
        "phase": wrapped,
        "coupling_force": force[m],
        "frequency": layer.omega[m],
        "strength": layer.strength[m],
    }
    if entropy is not None and m == 0:
        heads["attention_entropy"] = entropy
    entry["heads"] = {name: [float(v) for v in values] for name, values in heads.items()}
    return entry


def lattice_metrics(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`layer_report` of every lattice layer of `model` (members averaged), by module path."""
    return {name: layer_report(layer) for name, layer in lattice_layers(model)}


def _meta() -> bool:
    return torch.empty(0).is_meta
