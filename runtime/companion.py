"""The geolip SVAE companion: a rigid geometric code that rides alongside a host model.

Design 004 (docs/designs.md; AbstractPhil's geolip-svae-transformer) proposes a small autoencoder
that reads a host's feature tokens and reconstructs them through a code whose geometry is fixed
by construction rather than learned into shape:

    features (batch, tokens, input_width)
      -> residual-MLP encoder -> M: (batch, tokens, rows, sphere_dim), each row on S^(d-1)
      -> isometric lens d -> D:  M_lens = M @ E.T with E: (lens_dim, sphere_dim), E.T @ E = I
      -> spectrum S = column norms of M_lens over its rows: (batch, tokens, lens_dim)
      -> spectral-alpha attention across tokens: S * (1 + alpha * tanh(out(SDPA(qkv(norm(S))))))
      -> decoder reads M_lens * S_att (each column scaled by its attended spectrum value)
      -> reconstruction (batch, tokens, input_width)

The public code (AbstractEyes/geolip-svae: `model.py`'s `SpectralCrossAttention`,
`model_transformer.py`'s `LeanGeometricEncoder`, `SingleLens`, `SpectralAlphaAttention`,
`GeoDecoder`, `intrinsic_deviation`, `dev_critical`) was read to pin down what each stage
computes; the model card's `transformer_prototype.py` itself is not in the public index, so where
the two differ the package's `model_transformer.py` is followed. Choices and why:

* **Sphere normalisation.** The encoder's last linear layer (orthogonally initialised, as in the
  public encoder) is reshaped to `(rows, sphere_dim)` and each row normalised to unit length, then
  optionally sign-canonicalised (`canonical_signs`: first coordinate of magnitude > 1e-6 made
  positive, the public `canon`), which puts every row on a fixed hemisphere so antipodal rows,
  which the projective rigidity metric cannot tell apart, carry the same code.
* **Exact isometry.** The lens is `E = Q * sign(diag R)` from the QR decomposition of a free
  `(lens_dim, sphere_dim)` matrix, so its columns are orthonormal for *every* value of the free
  parameter and the optimiser can move it without ever leaving the Stiefel manifold (the sign fix
  makes the map continuous and the identity on matrices that are already orthonormal). Rows keep
  their norms and every Gram matrix `M M^T` is preserved, hence every pairwise angle and with them
  the frame deviation below. The public `SingleLens` is a fixed random orthonormal buffer;
  `lens_trainable=False` gives that, the default lets the lens rotate (still isometric). The
  lens, spectrum and sphere normalisation run in float32 with autocast off (the public code does
  its geometry in float64 the same way): bfloat16 would break the isometry at the 1e-2 level.
* **Spectrum.** `S[..., j] = ||M_lens[..., :, j]||`, the column norms over the rows, exactly the
  public `M_lens.norm(dim=-2)`. Since rows are unit vectors, `sum_j S_j^2 = rows`.
* **Spectral-alpha attention.** Per layer: LayerNorm -> fused q/k/v -> multi-head scaled dot
  product attention across *tokens* -> output projection -> tanh, used as a multiplicative gate
  `S * (1 + alpha * gate)`. `alpha = alpha_max * sigmoid(logit)` per spectral mode, so it can never
  leave `[0, alpha_max]` whatever the optimiser does, and the logit starts at
  `logit(alpha_init / alpha_max)` (the public `sigmoid(-2) * 0.2 ~= 0.024` is the default). The
  gate is multiplicative and bounded: attention can only rescale each spectral mode by a factor
  in `[1 - alpha, 1 + alpha]`, never inject content, and with `alpha == 0` the path is exactly
  the identity. `causal=True` masks attention so token t sees tokens <= t; every other stage is
  per token, so outputs at t then depend on inputs at <= t only.
* **Decoder.** `M_lens * S_att` (the public "mirrors U * S" modulation), flattened and read by a
  residual MLP back to `input_width`.
* **Objective.** The public trainers optimise pure MSE on the reconstruction, so `loss` is MSE;
  `cosine_weight > 0` adds `cosine_weight * (1 - cosine)` for hosts whose feature norms vary a
  lot (transformer hidden states), where direction is what the reported "recon cosine" measures.
  The public two-optimiser split (a battery trained on its own reconstruction, a detached stem
  feeding the shell) is not reproduced: here one reconstruction trains encoder, lens, attention
  and decoder together, which is what a companion riding on one host stream needs.
* **Frame deviation (rigidity).** For one token's frame of rows, the public `intrinsic_deviation`
  takes the mean over row pairs of the projective angle `acos|cos(r_i, r_j)|` minus the same mean
  for uniformly random directions on `S^(d-1)`; the frame is "in envelope" when
  `|deviation| < 0.02 * sqrt(d)` (`dev_critical`, d = `sphere_dim`: the model card's critical
  value 0.040 is 0.02 * sqrt(4)). The public code estimates the uniform baseline by Monte Carlo on
  4096 points; here it is the exact expectation, `int theta sin^(d-2) theta / int sin^(d-2) theta`
  over `[0, pi/2]`, integrated by Simpson's rule. Because the lens preserves every angle, the
  deviation of `M_lens` (against the same d-dimensional baseline) equals that of `M`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.configs import ENVELOPE_COEFF, CompanionConfig  # noqa: F401 (re-exported)

# alpha_init / alpha_max is clamped to [eps, 1 - eps] before the logit, so that alpha_init == 0 or
# alpha_init == alpha_max give a finite logit (within alpha_max * 1e-6 of the request).
_RATIO_EPS = 1e-6


class CompanionOutput(NamedTuple):
    """Everything one forward pass computes; `...` is `(batch, tokens)`."""

    reconstruction: Tensor  # (..., input_width)
    M: Tensor  # (..., rows, sphere_dim), rows on the unit sphere, float32
    M_lens: Tensor  # (..., rows, lens_dim), float32
    spectrum: Tensor  # (..., lens_dim), column norms of M_lens, float32
    attended: Tensor  # (..., lens_dim), spectrum after the spectral-alpha attention
    alpha: Tensor  # (layers, lens_dim), the per-mode alphas used


def _float32_region(device: torch.device):
    """Autocast off (for the geometric core) on devices autocast knows; nothing elsewhere."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def canonical_signs(rows: Tensor, eps: float = 1e-6) -> Tensor:
    """Flip each row so its first coordinate of magnitude > eps is positive (antipodes -> one)."""
    first = (rows.abs() > eps).to(torch.uint8).argmax(dim=-1, keepdim=True)
    lead = rows.gather(-1, first)
    return rows * torch.where(lead < 0, -1.0, 1.0).to(rows.dtype)


@functools.cache
def uniform_projective_angle(dim: int, intervals: int = 4096) -> float:
    """E[acos|<u, v>|] for independent uniform u, v on S^(dim-1), exactly (Simpson's rule).

    The angle theta between a fixed axis and a uniform direction has density proportional to
    sin(theta)^(dim - 2) on [0, pi]; folding to the projective angle restricts it to [0, pi/2].
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    h = (math.pi / 2) / intervals
    weight_sum = moment_sum = 0.0
    for i in range(intervals + 1):
        theta = i * h
        simpson = 1 if i in (0, intervals) else (4 if i % 2 else 2)
        density = math.sin(theta) ** (dim - 2)
        weight_sum += simpson * density
        moment_sum += simpson * theta * density
    return moment_sum / weight_sum


def frame_deviation(rows: Tensor, baseline_dim: int) -> Tensor:
    """Signed rigidity deviation of each frame: mean pairwise projective angle minus uniform's.

    `rows` is `(..., V, D)` (any D >= baseline_dim, e.g. the lensed frame), the result `(...)`.
    Differentiable (cosines are clamped below 1 so acos has a finite gradient).
    """
    with _float32_region(rows.device):
        unit = F.normalize(rows.float(), dim=-1)
        cos = (unit @ unit.transpose(-1, -2)).abs().clamp(0.0, 1.0 - 1e-7)
        count = rows.shape[-2]
        i, j = torch.triu_indices(count, count, offset=1, device=rows.device)
        mean_angle = torch.acos(cos[..., i, j]).mean(dim=-1)
    return mean_angle - uniform_projective_angle(baseline_dim)


class SpectralAlphaAttention(nn.Module):
    """`S * (1 + alpha * tanh(out(SDPA(qkv(LayerNorm(S))))))` across tokens, alpha per mode."""

    def __init__(
        self, width: int, heads: int, alpha_max: float, alpha_init: float, causal: bool
    ) -> None:
        super().__init__()
        self.width, self.heads, self.causal = width, heads, causal
        self.alpha_max = float(alpha_max)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        ratio = alpha_init / alpha_max if alpha_max > 0 else 0.5
        ratio = min(max(ratio, _RATIO_EPS), 1.0 - _RATIO_EPS)
        self.alpha_logits = nn.Parameter(torch.full((width,), math.log(ratio / (1.0 - ratio))))

    @property
    def alpha(self) -> Tensor:
        """Per-mode alpha in [0, alpha_max]."""
        return self.alpha_max * torch.sigmoid(self.alpha_logits.float())

    def gate(self, spectrum: Tensor) -> Tensor:
        """tanh of the attended, projected spectrum: `(batch, tokens, width)` in (-1, 1)."""
        batch, tokens, width = spectrum.shape
        qkv = self.qkv(self.norm(spectrum)).reshape(batch, tokens, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return torch.tanh(self.out(mixed.transpose(1, 2).reshape(batch, tokens, width)))

    def forward(self, spectrum: Tensor) -> Tensor:
        return spectrum * (1.0 + self.alpha * self.gate(spectrum))

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}, alpha_max={self.alpha_max}, causal={self.causal}"


class _ResidualMLP(nn.Module):
    """in -> GELU -> `depth` residual blocks (Linear, GELU, Linear) -> out."""

    def __init__(self, inputs: int, hidden: int, outputs: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(inputs, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class IsometricLens(nn.Module):
    """`x -> x @ E.T` with `E` (out, in) of exactly orthonormal columns, from QR of a free matrix."""

    def __init__(self, inputs: int, outputs: int, trainable: bool) -> None:
        super().__init__()
        self.inputs, self.outputs = inputs, outputs
        free = torch.empty(outputs, inputs)
        if not free.is_meta:
            nn.init.orthogonal_(free)
        if trainable:
            self.free = nn.Parameter(free)
        else:
            self.register_buffer("free", free)

    def matrix(self) -> Tensor:
        """E: (outputs, inputs), float32, E.T @ E = I to float32 precision."""
        with _float32_region(self.free.device):
            q, r = torch.linalg.qr(self.free.float())
            signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
            return q * signs

    def forward(self, x: Tensor) -> Tensor:
        with _float32_region(x.device):
            return x.float() @ self.matrix().T

    def extra_repr(self) -> str:
        return f"{self.inputs} -> {self.outputs}, trainable={isinstance(self.free, nn.Parameter)}"


class GeoCompanion(nn.Module):
    """The geolip companion: feature tokens -> rigid spherical code -> reconstructed tokens."""

    def __init__(self, config: CompanionConfig) -> None:
        super().__init__()
        if not isinstance(config, CompanionConfig):
            raise TypeError(f"config must be a CompanionConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = _ResidualMLP(c.input_width, c.hidden, c.rows * c.sphere_dim, c.depth)
        if not self.encoder.out.weight.is_meta:
            nn.init.orthogonal_(self.encoder.out.weight)
        self.lens = IsometricLens(c.sphere_dim, c.lens_dim, c.lens_trainable)
        self.attention = nn.ModuleList(
            SpectralAlphaAttention(c.lens_dim, c.heads, c.alpha_max, c.alpha_init, c.causal)
            for _ in range(c.layers)
        )
        self.decoder = _ResidualMLP(c.rows * c.lens_dim, c.hidden, c.input_width, c.depth)

    # -- the pipeline ---------------------------------------------------------------------------
    def encode(self, features: Tensor) -> Tensor:
        """(batch, tokens, input_width) -> M: (batch, tokens, rows, sphere_dim), unit rows."""
        c = self.config
        raw = self.encoder(features)
        with _float32_region(raw.device):
            m = raw.float().unflatten(-1, (c.rows, c.sphere_dim))
            m = F.normalize(m, dim=-1)
            return canonical_signs(m) if c.canonical_signs else m

    @staticmethod
    def spectrum_of(m_lens: Tensor) -> Tensor:
        """Column norms over the rows: (..., rows, D) -> (..., D)."""
        return torch.linalg.vector_norm(m_lens, dim=-2)

    def attend(self, spectrum: Tensor) -> Tensor:
        for layer in self.attention:
            spectrum = layer(spectrum)
        return spectrum

    def decode(self, m_lens: Tensor, attended: Tensor) -> Tensor:
        modulated = m_lens * attended.unsqueeze(-2)
        return self.decoder(modulated.flatten(-2))

    def forward(self, features: Tensor) -> CompanionOutput:
        if features.dim() != 3 or features.shape[-1] != self.config.input_width:
            raise ValueError(
                f"features must be (batch, tokens, {self.config.input_width}), "
                f"got {tuple(features.shape)}"
            )
        m = self.encode(features)
        m_lens = self.lens(m)
        with _float32_region(m_lens.device):
            spectrum = self.spectrum_of(m_lens)
        attended = self.attend(spectrum)
        reconstruction = self.decode(m_lens, attended)
        return CompanionOutput(reconstruction, m, m_lens, spectrum, attended, self.alpha)

    # -- objective and metrics ------------------------------------------------------------------
    def loss(self, features: Tensor, output: CompanionOutput) -> Tensor:
        """MSE (the public trainers' objective) + cosine_weight * (1 - mean cosine)."""
        recon, target = output.reconstruction.float(), features.float()
        loss = F.mse_loss(recon, target)
        if self.config.cosine_weight:
            cosine = F.cosine_similarity(recon, target, dim=-1).mean()
            loss = loss + self.config.cosine_weight * (1.0 - cosine)
        return loss

    @staticmethod
    def reconstruction_cosine(features: Tensor, output: CompanionOutput) -> Tensor:
        """Mean over tokens of cos(reconstruction, features), a scalar tensor."""
        return F.cosine_similarity(output.reconstruction.float(), features.float(), dim=-1).mean()

    def frame_deviation(self, frame: Tensor) -> Tensor:
        """Signed deviation per token of M (or M_lens) against the sphere_dim baseline: (...)."""
        return frame_deviation(frame, self.config.sphere_dim)

    @property
    def rigidity_envelope(self) -> float:
        return self.config.rigidity_envelope

    def in_envelope(self, frame: Tensor) -> Tensor:
        """Per token: |frame deviation| < 0.02 * sqrt(sphere_dim)."""
        return self.frame_deviation(frame).abs() < self.rigidity_envelope

    @property
    def alpha(self) -> Tensor:
        """(layers, lens_dim): every layer's per-mode alpha."""
        return torch.stack([layer.alpha for layer in self.attention])

    def mean_alpha_per_mode(self) -> Tensor:
        """(lens_dim,): each spectral mode's alpha averaged over layers."""
        return self.alpha.mean(dim=0)

    @torch.no_grad()
    def summary(self, features: Tensor, output: CompanionOutput | None = None) -> dict:
        """Plain-number metrics of one batch: cosine, deviation, envelope, alpha."""
        output = self(features) if output is None else output
        deviation = self.frame_deviation(output.M)
        return {
            "reconstruction_cosine": float(self.reconstruction_cosine(features, output)),
            "loss": float(self.loss(features, output)),
            "frame_deviation": float(deviation.mean()),
            "frame_deviation_abs_max": float(deviation.abs().max()),
            "in_envelope_fraction": float(
                (deviation.abs() < self.rigidity_envelope).float().mean()
            ),
            "rigidity_envelope": self.rigidity_envelope,
            "mean_alpha": float(self.alpha.mean()),
            "alpha_per_mode": [float(a) for a in self.mean_alpha_per_mode()],
        }
