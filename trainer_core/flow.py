"""Rectified-flow math: sigma sampling, time shifts, interpolation, target, timestep weights.

Convention (FLUX, SD3): ``x_t = (1 - σ)·x0 + σ·ε`` with σ ∈ (0, 1), σ = 1 pure noise;
the model predicts the velocity ``v = ε - x0`` (Liu et al. 2022, "Flow Straight and Fast";
Esser et al. 2024, "Scaling Rectified Flow Transformers", §2).

Every random draw takes an explicit ``torch.Generator`` so a step is reproducible from
``(seed, step)`` alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .registry import Registry

SIGMA_EPS = 1e-5  # keep σ strictly inside (0, 1): σ=0 has no noise, σ=1 has no signal


@dataclass(frozen=True)
class SigmaParams:
    """The few numbers a sigma scheme needs (a slice of ``FlowConfig``)."""

    sigmoid_mean: float = 0.0
    sigmoid_std: float = 1.0
    shift: float = 3.0
    image_tokens: int = 1024  # used by flux_shift: packed image tokens per sample


SigmaScheme = Callable[[int, torch.Generator, SigmaParams], torch.Tensor]
SIGMA_SCHEMES: Registry[SigmaScheme] = Registry("sigma scheme")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The per-step generator: a pure function of (seed, step, stream).

    ``stream`` separates independent consumers (validation, previews) so they never
    shift the training draws.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift ``σ' = s·σ / (1 + (s-1)·σ)``; s > 1 moves mass to high noise.

    Maps 0→0 and 1→1 and is monotone for s > 0 (Esser et al. 2024, eq. 23).
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(image_tokens: int) -> float:
    """FLUX's resolution-dependent shift exponent: μ linear from (256, 0.5) to (4096, 1.15)."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return 0.5 + slope * (image_tokens - 256)


def flux_shift_sigmas(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """``σ' = e^μ / (e^μ + 1/σ - 1)``: the shift with s = e^μ (BFL's ``time_shift``)."""
    return math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)


@SIGMA_SCHEMES.register("uniform")
def _scheme_uniform(n, g, p):
    return _uniform(n, g)


@SIGMA_SCHEMES.register("sigmoid")
def _scheme_sigmoid(n, g, p):
    """Logit-normal: σ = sigmoid(N(mean, std)) (Esser et al. 2024, §3.1)."""
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return torch.sigmoid(p.sigmoid_mean + p.sigmoid_std * z)


@SIGMA_SCHEMES.register("shift")
def _scheme_shift(n, g, p):
    return shift_sigmas(_uniform(n, g), p.shift)


@SIGMA_SCHEMES.register("flux_shift")
def _scheme_flux_shift(n, g, p):
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return flux_shift_sigmas(torch.sigmoid(z), flux_mu(p.image_tokens))


# content / style: T2I-Adapter (Mou et al. 2023, §3.4) observes that structure and
# composition are decided early in sampling, i.e. at HIGH noise, and texture/style late,
# at LOW noise. ai-toolkit follows that: `content` draws σ = 1-u³ (mass near σ=1) and
# `style` draws σ = u³ (mass near σ=0). One origin document states it the other way
# round; we follow the paper.
@SIGMA_SCHEMES.register("content")
def _scheme_content(n, g, p):
    return 1 - _uniform(n, g) ** 3


@SIGMA_SCHEMES.register("style")
def _scheme_style(n, g, p):
    return _uniform(n, g) ** 3


@SIGMA_SCHEMES.register("balanced")
def _scheme_balanced(n, g, p):
    """An equal mixture of `content` and `style`: each sample picks one by a coin flip."""
    u = _uniform(n, g) ** 3
    coin = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    return torch.where(coin, 1 - u, u)


def sample_sigmas(
    n: int, *, scheme: str, generator: torch.Generator, params: SigmaParams = SigmaParams()
) -> torch.Tensor:
    """Draw ``n`` noise levels in (0, 1) as float32 [n]."""
    sigma = SIGMA_SCHEMES.get(scheme)(n, generator, params)
    return sigma.clamp(SIGMA_EPS, 1 - SIGMA_EPS).float()


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1-σ)·x0 + σ·ε``; ``sigma`` [B] broadcasts over the other dims."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v = ε - x0``, the time derivative of ``x_t``."""
    return noise - x0


def predicted_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Invert the interpolation given a velocity: ``x0 = x_t - σ·v``."""
    s = sigma.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return x_t - s * velocity


# ---------------------------------------------------------------- timestep weighting
Weighting = Callable[[torch.Tensor], torch.Tensor]
WEIGHTINGS: Registry[Weighting] = Registry("loss weighting")

# ∫₀¹ exp(-2(σ-½)²) dσ = √(π/2)·erf(1/√2); dividing by it gives mean 1 under uniform σ.
_BELL_MEAN = math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2))


@WEIGHTINGS.register("none")
def _weight_none(sigma: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(sigma)


@WEIGHTINGS.register("bell_shaped")
def _weight_bell(sigma: torch.Tensor) -> torch.Tensor:
    """``w(σ) ∝ exp(-2(σ-½)²)``, normalised to mean 1 over σ ~ U(0,1) (ai-toolkit's bell)."""
    return torch.exp(-2 * (sigma - 0.5) ** 2) / _BELL_MEAN


def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Integrate dx/dσ = v from σ=sigmas[0] (≈1) down to sigmas[-1] (0) with Euler steps."""
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity_fn(x, s.expand(x.shape[0]))
        x = x + (s_next - s) * v
    return x


def sampling_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """A descending schedule 1 → 0 of ``steps`` Euler steps, optionally shifted."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)
