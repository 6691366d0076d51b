"""Loss terms: each is ``term(ctx) -> scalar tensor | None`` with a ``name`` for the logs.

The loop sums whatever terms it is given; a term that does not apply on a step returns
None. Elementwise losses, Huber schedules and timestep weightings are registries, so a
new one is a function, not a branch in the loop.

Convention (``flow.py``): ``x_t = (1-σ)·x0 + σ·ε``, target ``v = ε - x0``, σ = 1 pure noise.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .atomic import atomic_write_text
from .flow import WEIGHTINGS, interpolate, predicted_x0
from .registry import Registry

log = logging.getLogger(__name__)

# (pred, target, c[B]) -> elementwise loss with pred's shape. ``c`` is the per-sample
# Huber parameter from a ``HUBER_SCHEDULES`` entry; losses that have none ignore it.
Elementwise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_FUNCTIONS: Registry[Elementwise] = Registry("loss type")

# (huber_c, sigma[B]) -> c per sample [B]
HuberSchedule = Callable[[float, torch.Tensor], torch.Tensor]
HUBER_SCHEDULES: Registry[HuberSchedule] = Registry("huber schedule")


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """c [B] → [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    return c.to(like).view(-1, *([1] * (like.dim() - 1)))


@HUBER_SCHEDULES.register("constant")
def _huber_constant(c, sigma):
    return torch.full_like(sigma, c)


@HUBER_SCHEDULES.register("exponential")
def _huber_exponential(c, sigma):
    """``c(σ) = huber_c^σ``: kohya's ``c^(t/1000)`` with t/1000 = σ. With c < 1 this is
    1 (MSE-like) at σ → 0 and huber_c (robust) at σ → 1."""
    return torch.as_tensor(c, dtype=sigma.dtype) ** sigma


@HUBER_SCHEDULES.register("snr")
def _huber_snr(c, sigma):
    """Flow-matching form of the SNR schedule: ``c(σ) = (1 - huber_c)·(1-σ)² + huber_c``.

    kohya's ``snr`` schedule needs a DDPM noise table (it raises for FLUX). For rectified
    flow SNR(σ) = ((1-σ)/σ)²; the factor (1-σ)² (the signal power, which falls
    monotonically with SNR from 1 at σ = 0 to 0 at σ = 1) interpolates c between 1
    (MSE-like, low noise) and huber_c (robust, high noise).
    """
    return (1 - c) * (1 - sigma) ** 2 + c


@LOSS_FUNCTIONS.register("mse")
def _mse(pred, target, c):
    return (pred - target) ** 2


@LOSS_FUNCTIONS.register("l1")
def _l1(pred, target, c):
    return (pred - target).abs()


@LOSS_FUNCTIONS.register("huber")
def _huber(pred, target, c):
    """Pseudo-Huber ``2c(√(d²+c²) - c)``: ≈ d² for |d| ≪ c, ≈ 2c|d| for |d| ≫ c (kohya)."""
    c = _per_sample(c, pred)
    return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)


@LOSS_FUNCTIONS.register("smooth_l1")
def _smooth_l1(pred, target, c):
    """``2(√(d²+c²) - c)``: the pseudo-Huber without the leading c, ≈ d²/c near 0, ≈ 2|d| far."""
    c = _per_sample(c, pred)
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


def min_snr_weight(sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting")
    for a loss on the velocity ``v = ε - x0``.

    Derivation. Min-SNR weights the x0-prediction loss by ``min(SNR, γ)``, i.e. the
    objective ``min(SNR, γ)·|x̂0 - x0|²``. With ``x_t = (1-σ)x0 + σε``, the x0 implied by
    a velocity is ``x̂0 = x_t - σ·v̂`` so ``x̂0 - x0 = σ(v - v̂)`` and
    ``|x̂0 - x0|² = σ²·|v̂ - v|²``. The same objective on the velocity loss is therefore
    weighted ``w(σ) = min(SNR, γ)·σ²`` with ``SNR(σ) = ((1-σ)/σ)²``, which simplifies to
    ``w(σ) = min((1-σ)², γ·σ²)``. It is 0 at both ends (σ → 0: γσ²; σ → 1: (1-σ)²) and
    peaks where (1-σ)² = γσ², at σ* = 1/(1+√γ).
    """
    return torch.minimum((1 - sigma) ** 2, gamma * sigma**2)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B]: the mean over every dim but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class FlowMatchingLoss:
    """The rectified-flow objective on the raw velocity: ``w(σ)·ℓ(v̂, ε - x0; c(σ))`` per sample.

    ``w`` is the product of the named ``flow.WEIGHTINGS`` entry, Min-SNR-γ (when
    ``min_snr_gamma > 0``) and any ``extra_weights``. Writes the per-sample losses
    (before weighting) to ``ctx.logs["per_sample"]`` so callbacks can log loss by σ.
    """

    name = "flow"

    def __init__(self, loss_type: str = "mse", weighting: str = "none", *, huber_c: float = 0.1,
                 huber_schedule: str = "constant", min_snr_gamma: float = 0.0,
                 extra_weights: Optional[list[Callable[[torch.Tensor], torch.Tensor]]] = None):
        self.elementwise = LOSS_FUNCTIONS.get(loss_type)
        self.schedule = HUBER_SCHEDULES.get(huber_schedule)
        self.huber_c = huber_c
        self.weighting = WEIGHTINGS.get(weighting)
        self.extra_weights = list(extra_weights or [])
        if min_snr_gamma > 0:
            self.extra_weights.append(functools.partial(min_snr_weight, gamma=min_snr_gamma))

    def weights(self, sigma: torch.Tensor) -> torch.Tensor:
        w = self.weighting(sigma)
        for extra in self.extra_weights:
            w = w * extra(sigma)
        return w

    def __call__(self, ctx) -> torch.Tensor:
        pred = ctx.predict()
        c = self.schedule(self.huber_c, ctx.sigma.float())
        per_sample = per_sample_mean(self.elementwise(pred.float(), ctx.target.float(), c))
        ctx.logs["per_sample"] = per_sample.detach()
        return (per_sample * self.weights(ctx.sigma).to(per_sample)).mean()


# ---------------------------------------------------------------- wavelet loss
@functools.lru_cache(maxsize=8)
def wavelet_filters(name: str) -> torch.Tensor:
    """The four 2-D analysis filters [4, 1, k, k] (approximation, then horizontal, vertical, diagonal detail) of wavelet ``name``.

    Taps come from PyWavelets (``pywt.Wavelet(name).dec_lo/dec_hi``); they are reversed
    because ``conv2d`` is a cross-correlation and the DWT a convolution. float64, CPU.
    """
    import pywt

    w = pywt.Wavelet(name)
    lo = torch.tensor(w.dec_lo[::-1], dtype=torch.float64)
    hi = torch.tensor(w.dec_hi[::-1], dtype=torch.float64)
    # Row filter (along H) ⊗ column filter (along W).
    return torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)]).unsqueeze(1)


WAVELETS = ("db4", "haar")


def dwt2(x: torch.Tensor, name: str = "db4") -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the 2-D discrete wavelet transform, differentiable.

    x [B, C, H, W] (H, W even) → (LL [B, C, H/2, W/2], highs [B, C, 3, H/2, W/2]) with the
    detail bands in pywt's order (horizontal, vertical, diagonal). Periodic padding (``mode="circular"``, pywt's ``periodization``):
    the transform is orthogonal for orthogonal wavelets (haar, dbN), so energy is kept and
    no border artefacts are invented; the output is exactly half size.
    """
    b, ch, h, w = x.shape
    filt = wavelet_filters(name).to(device=x.device, dtype=x.dtype)
    k = filt.shape[-1]
    flat = x.reshape(b * ch, 1, h, w)
    # (k-2)/2 taps of circular padding each side reproduce pywt.dwt2(mode="periodization")
    # exactly (tested), for haar (k=2, no padding) and db4 (k=8, 3 each side).
    pad = k - 2
    flat = F.pad(flat, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), mode="circular") if pad > 0 else flat
    bands = F.conv2d(flat, filt, stride=2)[..., : h // 2, : w // 2]
    bands = bands.reshape(b, ch, 4, h // 2, w // 2)
    return bands[:, :, 0], bands[:, :, 1:]


class WaveletLoss:
    """Extra loss on the high-frequency wavelet bands of the predicted x0.

    ``x̂0 = x_t - σ·v̂`` (``flow.predicted_x0``) with the *unperturbed* ``x_t`` (built from
    the target noise ε, so input perturbation never leaks into the target). The loss is
    ``weight · mean over levels of MSE(highs(x̂0), highs(x0))``, where each level
    transforms the previous LL band (stops early when a side would become odd or < 2).
    Note ``x̂0 - x0 = σ(v - v̂)``: this is a σ²-weighted loss on the velocity's detail bands.
    """

    name = "wavelet"

    def __init__(self, weight: float, wavelet: str = "db4", levels: int = 2):
        wavelet_filters(wavelet)  # fail now on an unknown name
        self.weight, self.wavelet, self.levels = weight, wavelet, levels

    def band_loss(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        total, used = x0.new_zeros(()), 0
        for _ in range(self.levels):
            if x0.shape[-1] % 2 or x0.shape[-2] % 2 or min(x0.shape[-2:]) < 2:
                break
            x0_hat, hi_hat = dwt2(x0_hat, self.wavelet)
            x0, hi = dwt2(x0, self.wavelet)
            total, used = total + F.mse_loss(hi_hat, hi), used + 1
        return total / max(used, 1)

    def __call__(self, ctx) -> torch.Tensor:
        x0 = ctx.batch.latents.float().to(ctx.x_t.device)
        x_t = interpolate(x0, ctx.noise.float(), ctx.sigma)
        x0_hat = predicted_x0(x_t, ctx.predict().float(), ctx.sigma)
        return self.weight * self.band_loss(x0_hat, x0)


# ---------------------------------------------------------------- loss by σ
class SigmaBinsCallback:
    """Mean training loss per σ bin (``bins`` equal-width bins over (0, 1)).

    Reads ``logs["sigma"]`` and ``logs["per_sample"]`` (unweighted per-sample losses) of
    every step, writes ``<run_dir>/loss_by_sigma.json`` every ``every`` steps and at the
    end, and logs a one-line summary at the end. A loop callback (duck-typed)."""

    def __init__(self, bins: int, every: int = 50, filename: str = "loss_by_sigma.json"):
        self.bins, self.every, self.filename = bins, every, filename
        self.sums = [0.0] * bins
        self.counts = [0] * bins

    def bin_of(self, sigma: float) -> int:
        return min(self.bins - 1, max(0, int(sigma * self.bins)))

    def add(self, sigmas: list[float], losses: list[float]) -> None:
        for s, v in zip(sigmas, losses):
            k = self.bin_of(s)
            self.sums[k] += v
            self.counts[k] += 1

    def table(self) -> dict:
        edges = [k / self.bins for k in range(self.bins + 1)]
        return {"format_version": 1, "bins": [
            {"sigma_lo": edges[k], "sigma_hi": edges[k + 1], "count": self.counts[k],
             "mean_loss": self.sums[k] / self.counts[k] if self.counts[k] else None}
            for k in range(self.bins)]}

    def write(self, state) -> None:
        run_dir = state.extra.get("run_dir")
        if run_dir is not None:
            atomic_write_text(Path(run_dir) / self.filename, json.dumps(self.table(), indent=1))

    def on_train_start(self, state) -> None: ...

    def on_step_start(self, state) -> None: ...

    def on_step_end(self, state, logs: dict) -> None:
        if "sigma" in logs:
            self.add(logs["sigma"], logs["per_sample"])
        if state.step % self.every == 0:
            self.write(state)

    def on_train_end(self, state, reason: str) -> None:
        self.write(state)
        cells = [f"{b['sigma_lo']:.1f}-{b['sigma_hi']:.1f}: {b['mean_loss']:.4g}"
                 for b in self.table()["bins"] if b["mean_loss"] is not None]
        log.info("loss by sigma: %s", ", ".join(cells) if cells else "no samples")
