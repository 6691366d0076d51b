"""Noise for the training step: ``noise_fn(x0, generator) -> ε`` or ``(ε, ε_input)``.

* ``ε`` is the noise of the target ``v = ε - x0`` (and of ``x_t`` unless a second tensor
  is returned);
* ``ε_input`` (input perturbation) is the noise of ``x_t`` only.

Every draw uses the step generator, on the CPU in float32 (so a step reproduces on any
device), in a fixed order: base noise, pyramid levels, offset, perturbation.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch

from .config import FlowConfig

NoiseOut = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
NoiseFn = Callable[[torch.Tensor, torch.Generator], NoiseOut]


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def pyramid_noise(shape: tuple[int, ...], generator: torch.Generator, discount: float) -> torch.Tensor:
    """Multi-resolution noise [B, C, H, W] with unit variance per element.

    ``n = Σ_i dⁱ·up_i(z_i) / √(Σ_i d²ⁱ)`` where ``z_i ~ N(0, I)`` has sides ⌈H/2ⁱ⌉×⌈W/2ⁱ⌉
    and ``up_i`` repeats each value over a 2ⁱ×2ⁱ block (nearest, then cropped to H×W);
    levels i = 0, 1, ... until both sides are 1. Nearest upsampling keeps every level's
    per-element variance at 1, so the sum is normalised exactly (not by the sample std),
    and low frequencies get extra power (the idea of Whitaker's "multi-resolution noise"
    and kohya's ``pyramid_noise_like``, which uses random scales and bilinear upsampling).
    ``discount = 0`` gives plain Gaussian noise (the same draw).
    """
    b, c, h, w = shape
    out = _randn(shape, generator)
    if discount <= 0:
        return out
    total, i = 1.0, 1
    while True:
        f = 2**i
        hh, ww = math.ceil(h / f), math.ceil(w / f)
        z = _randn((b, c, hh, ww), generator)
        up = z.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)[..., :h, :w]
        out = out + discount**i * up
        total += discount ** (2 * i)
        if hh == 1 and ww == 1:
            break
        i += 1
    return out / math.sqrt(total)


def offset_noise(shape: tuple[int, ...], generator: torch.Generator, strength: float) -> torch.Tensor:
    """Per-sample, per-channel constant [B, C, 1, 1] ~ N(0, strength²) (Guttenberg 2023,
    "Diffusion with offset noise"; kohya's ``noise_offset``): lets the model change an
    image's mean brightness/colour, which zero-mean noise barely exercises."""
    b, c = shape[:2]
    return strength * _randn((b, c) + (1,) * (len(shape) - 2), generator)


def make_noise_fn(flow: FlowConfig) -> NoiseFn:
    """The step's noise from ``flow.noise_offset``, ``flow.pyramid_noise_discount`` and
    ``flow.ip_noise_gamma``:

    ``ε = pyramid(d) + offset`` (Gaussian when both are 0), used by the target;
    with ``γ = ip_noise_gamma > 0`` the input gets ``ε_in = ε + γ·ξ``, ξ ~ N(0, I) fresh,
    so ``x_t = (1-σ)x0 + σ·ε_in`` while the target stays ``ε - x0`` (Ning et al. 2023,
    "Input Perturbation Reduces Exposure Bias in Diffusion Models"; kohya's ``ip_noise_gamma``).
    """
    discount, offset, gamma = flow.pyramid_noise_discount, flow.noise_offset, flow.ip_noise_gamma

    def noise_fn(x0: torch.Tensor, generator: torch.Generator) -> NoiseOut:
        shape = tuple(x0.shape)
        eps = pyramid_noise(shape, generator, discount)
        if offset > 0:
            eps = eps + offset_noise(shape, generator, offset)
        eps = eps.to(x0.device)
        if gamma > 0:
            return eps, eps + gamma * _randn(shape, generator).to(x0.device)
        return eps

    return noise_fn
