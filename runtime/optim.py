"""FAM (frequency-adaptive momentum) optimizer and a warmup + cosine learning-rate schedule.

Implements the FAM optimizer of design 003 (docs/designs.md): SGD with an EMA
("dampened") momentum, `m = a*m + (1-a)*g`, `p -= lr*m`, where the momentum coefficient `a` of a
parameter is adapted to the frequency content of its gradient. After `fam_start_step` steps, and
for parameters with more than `min_size` elements, a sample of the flattened gradient is
Fourier-analysed (`rfft`, magnitude, normalised to sum 1), split into `n_bands` band powers, the band
powers are smoothed by an EMA with coefficient `beta` (the first observation initialises it, as in
the original), and a *handler* chosen by the parameter's kind maps the smoothed bands to `a`. The
handler rules are the original's design and are kept as they are (`alpha` is the group's base momentum):

* `default`: uniform bands; high half > 0.3 -> `min(0.95, alpha + 0.05)`.
* `conv`: log-spaced bands; middle half > 0.4 -> `min(0.97, alpha + 0.07)`, else top quarter > 0.3
  -> `min(0.95, alpha + 0.05)`.
* `attention`: the lower half of the bins split into `n_bands // 2` bands and the upper half into
  the rest (the original's "more bands in the high half"; for even `n_bands` both halves get the same
  count); dominant band (argmax) below `n_bands // 4` -> `max(0.85, alpha - 0.05)`, above
  `3 * n_bands // 4` -> `min(0.98, alpha + 0.08)`.
* `embedding`: uniform bands; top quarter > 0.2 -> `min(0.98, alpha + 0.08)`.

The schedule is the original's `FAMScheduler2`: linear warmup, optional plateau, cosine decay
(cosine annealing: Loshchilov & Hutter, "SGDR", ICLR 2017; linear warmup: Goyal et al., 2017).

Bugs of the original fixed here:

1. The attention handler's name test, `any(name in name.lower() for name in pg['names'] for name in
   [...])`, rebinds `name` and so compares each keyword with itself: every group without a conv name
   became `attention`. `classify_name` / `fam_param_groups` classify by the owning module's type
   (`nn.MultiheadAttention`, `nn.Conv*`, `nn.Embedding*`) and then by keywords in the dotted
   parameter name (attention first, then embedding, then conv).
2. `step` printed, wrote JSON debug files and wrapped the analysis in a `try/except` that printed and
   silently fell back to plain momentum. Here `step` has no I/O and lets errors propagate; the
   debug dump is replaced by `FAM.effective_momentum()`, which reads state kept as tensors.
3. Large gradients were sampled with a fresh unseeded `randperm` every step, so runs were not
   reproducible and the spectrum was of a different, *shuffled* sample each step (shuffling also
   destroys the adjacency that a spectrum measures: alternating signs became white noise). Here the
   sample is `sample_size // sample_chunk` contiguous chunks of `sample_chunk` elements at positions
   drawn once per parameter, in increasing order, from a generator seeded by the group's `seed`
   and the parameter's index in the optimizer; the indices live in the parameter's state, so
   `state_dict`/`load_state_dict` round-trips exactly.
4. The original called `.item()` per band per parameter per step (a host sync each). Band powers are a
   matrix product with a cached 0/1 band-membership matrix, and the rules are `torch.where`s, so the
   effective momentum stays a 0-dim tensor on the parameter's device; `step` never syncs.
5. The original's uniform split used `len // n_bands` bins per band and dropped the remaining tail bins
   (the highest frequencies, exactly what the rules look at); its log split ended at `len - 1` and
   dropped the last bin; its attention split dropped tails of both halves. Every layout here has
   edges `0 = e_0 <= e_1 <= ... <= e_n = n_bins`, so the bands partition all bins and sum to 1.
6. Caps and floors could invert a rule: with `alpha = 0.97`, "raise to `min(0.95, alpha + 0.05)`"
   *lowered* momentum, and with `alpha = 0.5`, "lower to `max(0.85, alpha - 0.05)`" raised it. A
   raise is now `max(alpha, min(cap, alpha + delta))` and a lower `min(alpha, max(floor, alpha -
   delta))`; for the usual `alpha <= 0.9` the values are the original's.
7. `FAMScheduler2` kept evaluating its cosine past `total_steps`, where it rises again, and added a
   stray `1e-8`. `WarmupCosine` holds `min_lr` from `total_steps` on.

Choices: weight decay is added to the gradient by default, as in the original; with
`decoupled_weight_decay=True` it is applied to the parameter as `p *= 1 - lr * weight_decay` before
the update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), so that it is
not filtered by the momentum. The original's unused `layer_boost` option and its debug options are
dropped. Band EMAs are kept in float32 (float64 for float64 parameters) whatever the parameter dtype,
and `load_state_dict` is overridden because torch's loader casts *every* state tensor of a floating
parameter to the parameter's dtype: it would round the band EMAs to bf16 and turn the integer
sample indices into floats (which `index_select` rejects, and float32 cannot hold past 2**24).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "FAM",
    "HANDLERS",
    "AttentionFrequencyHandler",
    "ConvFrequencyHandler",
    "EmbeddingFrequencyHandler",
    "FrequencyHandler",
    "WarmupCosine",
    "band_powers",
    "classify_name",
    "fam_param_groups",
]


def _raised(alpha: float, delta: float, cap: float) -> float:
    """`alpha + delta` capped at `cap`, but never below `alpha` (a raise never lowers)."""
    return max(alpha, min(cap, alpha + delta))


def _lowered(alpha: float, delta: float, floor: float) -> float:
    """`alpha - delta` floored at `floor`, but never above `alpha` (a lowering never raises)."""
    return min(alpha, max(floor, alpha - delta))


def _uniform_edges(start: int, stop: int, count: int) -> list[int]:
    """`count + 1` edges splitting `[start, stop)` into near-equal parts (sizes differ by <= 1)."""
    length = stop - start
    return [start + (i * length) // count for i in range(count + 1)]


class FrequencyHandler:
    """The `default` handler: uniform bands; high half > 0.3 -> `min(0.95, alpha + 0.05)`.

    A handler has two parts: `band_edges` (how the `n_bins` rfft bins are grouped into bands) and
    `momentum` (how the smoothed band powers set the effective momentum). `momentum` uses tensor
    ops only, so it runs on the parameter's device without a host sync.
    """

    name = "default"

    def band_edges(self, n_bins: int, n_bands: int) -> tuple[int, ...]:
        """Edges `0 = e_0 <= ... <= e_n = n_bins`; band `i` holds bins `[e_i, e_{i+1})`."""
        return tuple(_uniform_edges(0, n_bins, n_bands))

    def momentum(self, bands: Tensor, alpha: float) -> Tensor:
        n = bands.numel()
        high = bands[n // 2 :].sum()
        return torch.where(high > 0.3, _raised(alpha, 0.05, 0.95), alpha)

    def band_powers(self, sample: Tensor, n_bands: int, eps: float = 1e-8) -> Tensor:
        """Normalised rfft magnitude of a 1-D `sample`, summed per band of this handler's layout."""
        n_bins = sample.numel() // 2 + 1
        matrix = _band_matrix(self.name, n_bins, n_bands).to(sample.device, _analysis_dtype(sample))
        return band_powers(sample, matrix, eps)


class ConvFrequencyHandler(FrequencyHandler):
    """`conv`: log-spaced bands; mid > 0.4 -> +0.07 (cap 0.97), else high quarter > 0.3 -> +0.05
    (cap 0.95). Log spacing resolves the low frequencies of smooth filters finely."""

    name = "conv"

    def band_edges(self, n_bins: int, n_bands: int) -> tuple[int, ...]:
        # e_i = floor((n_bins + 1) ** (i / n)) - 1 runs from 0 to n_bins; the original's
        # int(n_bins ** (i / n)) - 1 ended at n_bins - 1 and so never saw the last bin.
        edges = [0]
        for i in range(1, n_bands):
            edge = math.floor((n_bins + 1) ** (i / n_bands)) - 1
            edges.append(min(n_bins, max(edges[-1], edge)))
        edges.append(n_bins)
        return tuple(edges)

    def momentum(self, bands: Tensor, alpha: float) -> Tensor:
        n = bands.numel()
        mid = bands[n // 4 : (3 * n) // 4].sum()
        high = bands[(3 * n) // 4 :].sum()
        return torch.where(
            mid > 0.4,
            _raised(alpha, 0.07, 0.97),
            torch.where(high > 0.3, _raised(alpha, 0.05, 0.95), alpha),
        )


class AttentionFrequencyHandler(FrequencyHandler):
    """`attention`: bands split per half of the spectrum; a dominant low band lowers momentum
    (`max(0.85, alpha - 0.05)`), a dominant high band raises it (`min(0.98, alpha + 0.08)`)."""

    name = "attention"

    def band_edges(self, n_bins: int, n_bands: int) -> tuple[int, ...]:
        n_low = n_bands // 2
        if n_low == 0:  # one band: it must cover everything (the original left the low half out)
            return (0, n_bins)
        half = n_bins // 2
        low = _uniform_edges(0, half, n_low)
        high = _uniform_edges(half, n_bins, n_bands - n_low)
        return tuple(low[:-1] + high)

    def momentum(self, bands: Tensor, alpha: float) -> Tensor:
        n = bands.numel()
        dominant = torch.argmax(bands)
        return torch.where(
            dominant < n // 4,
            _lowered(alpha, 0.05, 0.85),
            torch.where(dominant > (3 * n) // 4, _raised(alpha, 0.08, 0.98), alpha),
        )


class EmbeddingFrequencyHandler(FrequencyHandler):
    """`embedding`: uniform bands; high quarter > 0.2 -> `min(0.98, alpha + 0.08)` (embeddings
    get the strongest smoothing, at a lower threshold)."""

    name = "embedding"

    def momentum(self, bands: Tensor, alpha: float) -> Tensor:
        n = bands.numel()
        high = bands[(3 * n) // 4 :].sum()
        return torch.where(high > 0.2, _raised(alpha, 0.08, 0.98), alpha)


HANDLERS: Mapping[str, FrequencyHandler] = MappingProxyType(
    {
        h.name: h
        for h in (
            FrequencyHandler(),
            ConvFrequencyHandler(),
            AttentionFrequencyHandler(),
            EmbeddingFrequencyHandler(),
        )
    }
)


@functools.lru_cache(maxsize=512)
def _band_matrix(handler: str, n_bins: int, n_bands: int) -> Tensor:
    """`(n_bands, n_bins)` 0/1 float32 matrix: row `i` selects the bins of band `i` (CPU)."""
    edges = HANDLERS[handler].band_edges(n_bins, n_bands)
    if len(edges) != n_bands + 1 or edges[0] != 0 or edges[-1] != n_bins:
        raise ValueError(
            f"handler {handler!r} gave edges {edges} for {n_bins} bins, {n_bands} bands"
        )
    matrix = torch.zeros(n_bands, n_bins)
    for i in range(n_bands):
        if edges[i + 1] < edges[i]:
            raise ValueError(f"handler {handler!r} gave decreasing edges {edges}")
        matrix[i, edges[i] : edges[i + 1]] = 1.0
    return matrix


def _analysis_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def band_powers(sample: Tensor, matrix: Tensor, eps: float = 1e-8) -> Tensor:
    """Band powers of a 1-D `sample`: `matrix @ (|rfft| / (sum |rfft| + eps))`.

    `matrix` is a `(n_bands, n_bins)` band-membership matrix; a matmul (not `index_add`, whose
    atomics are order-nondeterministic on GPU) keeps the result reproducible.
    """
    power = torch.fft.rfft(sample.to(matrix.dtype)).abs()
    return matrix @ (power / (power.sum() + eps))


# ----------------------------------------------------------------------------- classification

_ATTENTION_WORDS = ("attn", "attention", "qkv", "mha", "multihead")
_EMBEDDING_WORDS = ("embed", "token", "table", "positions", "wte", "wpe")
_CONV_WORDS = ("conv",)


def classify_name(name: str) -> str:
    """Handler for a dotted parameter name by keyword (substring, case-insensitive).

    Attention keywords win over embedding ones, which win over `conv`; anything else is
    `default`. Substring matching is a heuristic (a `stable_norm` would read as an embedding
    `table`): pass `classify=` to `fam_param_groups`, or explicit groups, to override it.
    """
    lower = name.lower()
    for kind, words in (
        ("attention", _ATTENTION_WORDS),
        ("embedding", _EMBEDDING_WORDS),
        ("conv", _CONV_WORDS),
    ):
        if any(word in lower for word in words):
            return kind
    return "default"


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return None


def _classify_in_model(name: str, modules: Mapping[str, nn.Module]) -> str:
    """Nearest owning module of a known type decides; otherwise the name's keywords."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = modules.get(".".join(parts[:depth]))
        kind = None if module is None else _module_kind(module)
        if kind is not None:
            return kind
    return classify_name(name)


def fam_param_groups(
    model: nn.Module,
    *,
    classify: Callable[[str, nn.Parameter], str] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for `FAM`, one per handler kind, in order of first appearance.

    Each group is `{"params": [...], "param_names": [...], "handler": kind, **group_options}`;
    parameters with `requires_grad=False` are left out. The kind comes from `classify(name, param)`
    when given, else from the nearest owning `nn.MultiheadAttention` / `nn.Conv*` /
    `nn.Embedding*` module, else from `classify_name(name)`. `group_options` are FAM options
    (`lr`, `alpha`, ...) applied to every group; unknown option names raise `ValueError`.
    """
    reserved = {"params", "param_names", "handler"} & group_options.keys()
    if reserved:
        raise ValueError(f"fam_param_groups sets {sorted(reserved)} itself; do not pass them")
    unknown = group_options.keys() - _OPTIONS
    if unknown:
        raise ValueError(f"unknown FAM option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    modules = dict(model.named_modules())
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = classify(name, param) if classify is not None else _classify_in_model(name, modules)
        if kind not in HANDLERS:
            raise ValueError(
                f"classify returned unknown handler {kind!r} for {name!r}; "
                f"known handlers: {sorted(HANDLERS)}"
            )
        group = groups.setdefault(
            kind, {"params": [], "param_names": [], "handler": kind, **group_options}
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


# ----------------------------------------------------------------------------- optimizer

_OPTIONS = frozenset(
    (
        "lr",
        "alpha",
        "beta",
        "eps",
        "weight_decay",
        "decoupled_weight_decay",
        "n_bands",
        "fam_start_step",
        "min_size",
        "sample_size",
        "sample_chunk",
        "seed",
    )
)

# State that must keep its own dtype: torch's load_state_dict casts every tensor in a floating
# parameter's state to the parameter's dtype (it would make the sample indices float).
_KEEP_DTYPE_KEYS = ("bands", "effective_alpha", "sample_idx")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(group: Mapping[str, Any]) -> None:
    """ValueError with a clear message for any out-of-range FAM option of a (merged) group."""

    def fail(key: str, what: str) -> None:
        raise ValueError(f"FAM: {key} must be {what}, got {group[key]!r}")

    if not _is_real(group["lr"]) or group["lr"] < 0:
        fail("lr", "a finite number >= 0")
    for key in ("alpha", "beta"):
        if not _is_real(group[key]) or not 0.0 <= group[key] < 1.0:
            fail(key, "a number in [0, 1)")
    for key in ("eps", "weight_decay"):
        if not _is_real(group[key]) or group[key] < 0:
            fail(key, "a finite number >= 0")
    if not isinstance(group["decoupled_weight_decay"], bool):
        fail("decoupled_weight_decay", "a bool")
    if not _is_int(group["n_bands"]) or group["n_bands"] < 1:
        fail("n_bands", "an int >= 1")
    for key in ("fam_start_step", "min_size", "seed"):
        if not _is_int(group[key]) or group[key] < 0:
            fail(key, "an int >= 0")
    if not _is_int(group["sample_chunk"]) or group["sample_chunk"] < 1:
        fail("sample_chunk", "an int >= 1")
    if not _is_int(group["sample_size"]) or group["sample_size"] < group["sample_chunk"]:
        fail("sample_size", f"an int >= sample_chunk ({group['sample_chunk']})")
    if group["handler"] not in HANDLERS:
        fail("handler", f"one of {sorted(HANDLERS)}")


def _handler_for_names(names: Sequence[str]) -> str:
    kinds = sorted({classify_name(n) for n in names})
    if len(kinds) > 1:
        raise ValueError(
            f"FAM: a parameter group without 'handler' mixes parameter kinds {kinds}; "
            "give it a 'handler' or split it with fam_param_groups(model)"
        )
    return kinds[0] if kinds else "default"


def _sample_indices(numel: int, sample_size: int, chunk: int, seed: int, index: int) -> Tensor:
    """Sorted flat indices of `sample_size // chunk` whole, distinct `chunk`-aligned runs.

    Drawn from a CPU generator seeded by `(seed, index)` so that each parameter has its own fixed
    sample, reproducible from the optimizer's `seed` alone.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    slots = torch.randperm(numel // chunk, generator=generator)[: sample_size // chunk]
    starts = slots.sort().values * chunk
    return (starts[:, None] + torch.arange(chunk)).reshape(-1)


class FAM(Optimizer):
    """Frequency-adaptive momentum: `m = a*m + (1-a)*g; p -= lr*m` with `a` set by a handler.

    Args (all but `params` may be overridden per group):
        params: an iterable of tensors (one `default` group), of `(name, tensor)` pairs (split into
            one group per `classify_name` kind), or of group dicts (`fam_param_groups(model)`).
            A dict without `handler` gets the kind of its `param_names`, or `default`.
        lr: step size (>= 0).
        alpha: base momentum coefficient of the EMA, in [0, 1).
        beta: EMA coefficient of the band powers, in [0, 1).
        eps: added to the spectrum's sum before normalising.
        weight_decay: L2 coefficient; added to the gradient unless `decoupled_weight_decay`.
        decoupled_weight_decay: apply decay as `p *= 1 - lr*weight_decay` (AdamW style) instead.
        n_bands: number of frequency bands (>= 1).
        fam_start_step: the momentum adapts from step `fam_start_step + 1` on; before that FAM is
            plain EMA momentum.
        min_size: only parameters with more than `min_size` elements are analysed.
        sample_size: gradients with more elements are sampled: `sample_size // sample_chunk`
            contiguous runs of `sample_chunk` elements at fixed, seeded positions.
        sample_chunk: length of each contiguous run of the sample.
        seed: seeds the sample positions (with the parameter's index in the optimizer).

    Per-parameter state: `step` (int), `exp_avg`, and once analysed `bands` (smoothed band powers),
    `effective_alpha` (0-dim tensor) and, for sampled parameters, `sample_idx`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        alpha: float = 0.9,
        beta: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        n_bands: int = 8,
        fam_start_step: int = 100,
        min_size: int = 256,
        sample_size: int = 4096,
        sample_chunk: int = 64,
        seed: int = 0,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "beta": beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "n_bands": n_bands,
            "fam_start_step": fam_start_step,
            "min_size": min_size,
            "sample_size": sample_size,
            "sample_chunk": sample_chunk,
            "seed": seed,
        }
        _check_options({**defaults, "handler": "default"})
        if isinstance(params, Tensor):
            raise TypeError("FAM: params must be an iterable of tensors, pairs or dicts")
        items = list(params)
        if items and all(isinstance(x, tuple) for x in items):
            split: dict[str, dict[str, Any]] = {}
            for name, param in items:
                kind = classify_name(name)
                split.setdefault(kind, {"params": [], "handler": kind})["params"].append(
                    (name, param)
                )
            items = list(split.values())
        self._matrices: dict[tuple[Any, ...], Tensor] = {}
        super().__init__(items, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, resolving its `handler` and validating its options before adding it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch rejects sets with its own message
            params = list(params)
        group["params"] = params
        if "handler" not in group:
            names = group.get("param_names") or [x[0] for x in params if isinstance(x, tuple)]
            group["handler"] = _handler_for_names(names)
        _check_options({**self.defaults, **group})
        for p in params:
            tensor = p[1] if isinstance(p, tuple) else p
            if isinstance(tensor, Tensor) and torch.is_complex(tensor):
                raise ValueError("FAM does not support complex parameters")
        super().add_param_group(group)

    def _matrix(self, handler: str, n_bins: int, n_bands: int, like: Tensor) -> Tensor:
        key = (handler, n_bins, n_bands, like.device, like.dtype)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = _band_matrix(handler, n_bins, n_bands).to(like.device, like.dtype)
            self._matrices[key] = matrix
        return matrix

    def _adaptive_momentum(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], index: int
    ) -> Tensor:
        flat = grad.reshape(-1)
        if flat.numel() > group["sample_size"]:
            if "sample_idx" not in state:
                idx = _sample_indices(
                    flat.numel(), group["sample_size"], group["sample_chunk"], group["seed"], index
                )
                state["sample_idx"] = idx.to(p.device)
            flat = flat.index_select(0, state["sample_idx"])
        sample = flat.to(_analysis_dtype(flat))
        n_bands = group["n_bands"]
        matrix = self._matrix(group["handler"], sample.numel() // 2 + 1, n_bands, sample)
        observed = band_powers(sample, matrix, group["eps"])
        bands = state.get("bands")
        if bands is None or bands.shape != observed.shape:
            state["bands"] = observed
        else:
            bands.mul_(group["beta"]).add_(observed, alpha=1.0 - group["beta"])
        alpha = HANDLERS[group["handler"]].momentum(state["bands"], group["alpha"])
        state["effective_alpha"] = alpha
        return alpha

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            lr, alpha, wd = group["lr"], group["alpha"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(
                        "FAM does not support sparse gradients (e.g. nn.Embedding(sparse=True))"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if wd != 0:
                    if group["decoupled_weight_decay"]:
                        p.mul_(1.0 - lr * wd)
                    else:
                        grad = grad.add(p, alpha=wd)
                exp_avg = state["exp_avg"]
                if state["step"] > group["fam_start_step"] and p.numel() > group["min_size"]:
                    a = self._adaptive_momentum(p, grad, state, group, index)
                    exp_avg.mul_(a).addcmul_(grad, 1.0 - a)
                else:
                    exp_avg.mul_(alpha).add_(grad, alpha=1.0 - alpha)
                p.add_(exp_avg, alpha=-lr)
        return loss

    def effective_momentum(self) -> dict[str, float]:
        """Mean latest effective momentum per handler, over the parameters analysed so far.

        Handlers with no analysed parameter are absent. This reads the tensors kept in state, so
        it syncs once per handler: call it for metrics, not inside a hot loop.
        """
        per_handler: dict[str, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "effective_alpha" in state:
                    per_handler.setdefault(group["handler"], []).append(
                        state["effective_alpha"].detach().to("cpu", torch.float64)
                    )
        return {k: torch.stack(v).mean().item() for k, v in per_handler.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch's loader, but band EMAs, effective momenta and sample indices keep their dtype."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        kept: list[tuple[Tensor, str, Tensor]] = []
        if len(saved_ids) == len(params):  # otherwise torch raises below
            for saved_id, p in zip(saved_ids, params, strict=True):
                saved = state_dict["state"].get(saved_id, {})
                kept.extend((p, k, saved[k]) for k in _KEEP_DTYPE_KEYS if k in saved)
        super().load_state_dict(state_dict)
        for p, key, value in kept:
            self.state[p][key] = value.detach().clone().to(p.device)


# ----------------------------------------------------------------------------- schedule


class WarmupCosine(LRScheduler):
    """Linear warmup, optional plateau, cosine decay, then flat: step-based.

    With `t` the number of scheduler steps taken and `b` a group's base lr:

    * `t < warmup_steps`: `warmup_start_lr + (b - warmup_start_lr) * t / warmup_steps`;
    * `warmup_steps <= t < decay_start` (plateau, only if `decay_start > warmup_steps`): `b`;
    * `decay_start <= t < total_steps`: `min_lr + (b - min_lr) * (1 + cos(pi * s)) / 2` with
      `s = (t - decay_start) / (total_steps - decay_start)`;
    * `t >= total_steps`: `min_lr` (the original's `FAMScheduler2` rose again past the end).

    `decay_start` defaults to `warmup_steps`. The lr is a closed form of `t`, so `state_dict`
    round-trips and `step(epoch)` works. Raises ValueError unless `0 <= warmup_steps <=
    decay_start <= total_steps`, `total_steps >= 1`, and `0 <= warmup_start_lr, min_lr <= b` for
    every group.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
        decay_start: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"WarmupCosine: total_steps must be an int >= 1, got {total_steps!r}")
        if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosine: warmup_steps must be an int in [0, total_steps={total_steps}], "
                f"got {warmup_steps!r}"
            )
        decay_start = warmup_steps if decay_start is None else decay_start
        if not _is_int(decay_start) or not warmup_steps <= decay_start <= total_steps:
            raise ValueError(
                f"WarmupCosine: decay_start must be an int in [warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}], got {decay_start!r}"
            )
        for key, value in (("warmup_start_lr", warmup_start_lr), ("min_lr", min_lr)):
            if not _is_real(value) or value < 0:
                raise ValueError(f"WarmupCosine: {key} must be a finite number >= 0, got {value!r}")
        for i, group in enumerate(optimizer.param_groups):
            base = group.get("initial_lr", group["lr"])
            if not _is_real(base) or base < max(warmup_start_lr, min_lr):
                raise ValueError(
                    f"WarmupCosine: param group {i} has base lr {base!r}, which must be a number "
                    f">= warmup_start_lr ({warmup_start_lr}) and >= min_lr ({min_lr})"
                )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.warmup_start_lr = float(warmup_start_lr)
        self.min_lr = float(min_lr)
        self.decay_start = decay_start
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each group after `step` scheduler steps."""
        return [self._lr(step, float(base)) for base in self.base_lrs]

    def _lr(self, t: int, base: float) -> float:
        if t < self.warmup_steps:
            return self.warmup_start_lr + (base - self.warmup_start_lr) * t / self.warmup_steps
        if t < self.decay_start:
            return base
        if t < self.total_steps:
            s = (t - self.decay_start) / (self.total_steps - self.decay_start)
            return self.min_lr + (base - self.min_lr) * (1.0 + math.cos(math.pi * s)) / 2.0
        return self.min_lr

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)
