"""A fixed, weight-free "VAE" for the embedded demo: 16 low-frequency DCT coefficients
per 8×8 block.

Each 8×8 RGB block is a vector in a 192-dim space (3 colours × 64 pixels). We project it
onto 16 orthonormal vectors built from the orthonormal 2-D DCT-II basis
``b_uv(y, x) = c(u)·c(v)·cos(π(2y+1)u/16)·cos(π(2x+1)v/16)``, ``c(0)=√(1/8)``,
``c(k>0)=√(2/8)`` (u: vertical frequency, v: horizontal):

* channels 0-8: for each colour R, G, B the DC ``(0,0)``, first horizontal ``(0,1)`` and
  first vertical ``(1,0)`` coefficient, ordered frequency-major
  (R·DC, G·DC, B·DC, R·(0,1), G·(0,1), B·(0,1), R·(1,0), G·(1,0), B·(1,0));
* channels 9-15: luminance ``(R+G+B)/√3`` at (0,2), (2,0), (1,1), (0,3), (3,0), (1,2), (2,1).

The 16 vectors are orthonormal (distinct frequencies, or the same frequency in orthogonal
colour directions), so encode is a projection and decode its transpose: decode∘encode is
the least-squares reconstruction from these coefficients, idempotent before the clamp.
Both are a single strided (transposed) convolution with a [16, 3, 8, 8] kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 8
COLOUR_FREQS = ((0, 0), (0, 1), (1, 0))
LUMA_FREQS = ((0, 2), (2, 0), (1, 1), (0, 3), (3, 0), (1, 2), (2, 1))

# Per-channel divisors so the latents of typical images have roughly unit variance.
# Measured as the RMS of each raw coefficient over the demo dataset
# (``demo.dataset.write_demo_dataset(seed=0)``, 12 images: DC ≈ 3.5-4.7, first AC ≈ 0.5-0.9,
# luminance (0,2)/(2,0)/(1,1) ≈ 0.3-0.37, the rest ≈ 0.16-0.2) and rounded. A block's DC
# is 8× its mean value in [-1, 1], so DCs are large; first AC terms carry edges and
# gradients; the higher luminance terms are small. Resulting latent RMS: 0.9-1.7.
CHANNEL_SCALES = (
    (4.0, 4.0, 4.0)  # R, G, B DC
    + (0.5, 0.5, 0.5)  # R, G, B horizontal (0,1)
    + (0.5, 0.5, 0.5)  # R, G, B vertical (1,0)
    + (0.25, 0.25, 0.25)  # luminance (0,2) (2,0) (1,1)
    + (0.15, 0.15, 0.15, 0.15)  # luminance (0,3) (3,0) (1,2) (2,1)
)


def dct_basis(u: int, v: int) -> torch.Tensor:
    """Orthonormal 2-D DCT-II basis image ``[8, 8]`` for vertical frequency u, horizontal v."""
    n = torch.arange(BLOCK, dtype=torch.float64)

    def axis(k: int) -> torch.Tensor:
        c = math.sqrt((1 if k == 0 else 2) / BLOCK)
        return c * torch.cos(math.pi * (2 * n + 1) * k / (2 * BLOCK))

    return axis(u)[:, None] * axis(v)[None, :]


def codec_kernel() -> torch.Tensor:
    """The 16 orthonormal block vectors as a conv kernel ``[16, 3, 8, 8]`` (float64)."""
    rows = []
    for u, v in COLOUR_FREQS:
        for colour in range(3):
            k = torch.zeros(3, BLOCK, BLOCK, dtype=torch.float64)
            k[colour] = dct_basis(u, v)
            rows.append(k)
    luma = torch.full((3, 1, 1), 1 / math.sqrt(3), dtype=torch.float64)
    for u, v in LUMA_FREQS:
        rows.append(luma * dct_basis(u, v))
    return torch.stack(rows)


class DctCodec:
    """``LatentCodec``: pixels [B, 3, H, W] in [-1, 1] ↔ latents [B, 16, H/8, W/8].

    ``encode(x) = conv(x, K, stride 8) / scale``; ``decode(z) = clamp(convᵀ(z·scale, K), -1, 1)``.
    H and W must be multiples of 8.
    """

    identity = "dct16-v1"
    downscale = BLOCK
    latent_channels = 16

    def __init__(self):
        self._kernel = codec_kernel().float()
        self._scale = torch.tensor(CHANNEL_SCALES, dtype=torch.float32).view(1, -1, 1, 1)

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return self._kernel.to(like.device, dtype), self._scale.to(like.device, dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"DctCodec.encode expects [B, 3, H, W] pixels, got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % BLOCK or w % BLOCK:
            raise ValueError(f"DctCodec needs image sides that are multiples of {BLOCK}, got {h}×{w}")
        kernel, scale = self._params(pixels)
        return F.conv2d(pixels.to(kernel.dtype), kernel, stride=BLOCK) / scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"DctCodec.decode expects [B, 16, h, w] latents, got {tuple(latents.shape)}")
        kernel, scale = self._params(latents)
        pixels = F.conv_transpose2d(latents.to(kernel.dtype) * scale, kernel, stride=BLOCK)
        return pixels.clamp(-1.0, 1.0)

    def release(self) -> None:
        """Nothing to free (no weights); present so callers can treat all codecs alike."""
