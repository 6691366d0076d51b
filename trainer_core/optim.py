"""Optimizers, learning-rate schedules and parameter-group builders, by name.

Schedules are multipliers of the peak lr as a function of the *optimizer* step (not the
micro-step), so gradient accumulation never stretches a schedule. Every schedule has the
same linear warmup and, after it, the floor ``min_lr_ratio = r``: the multiplier is
``r + (1 - r)·s(p)`` with the schedule's shape ``s ∈ [0, 1]`` and the post-warmup
progress ``p ∈ [0, 1]``, so the lr never drops below ``lr·r``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

import torch

from .config import OptimConfig
from .registry import Registry

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[dict], OptimConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

Schedule = Callable[[int, int, OptimConfig], float]  # (step, total_steps, cfg) -> lr multiplier
SCHEDULES: Registry[Schedule] = Registry("lr schedule")

ParamGroupBuilder = Callable[[Any, OptimConfig], list[dict]]
PARAM_GROUPS: Registry[ParamGroupBuilder] = Registry("parameter grouping")


def _needs(package: str, optimizer: str, pip: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:  # optional dependency: say how to get it
        raise RuntimeError(f"optim.optimizer={optimizer!r} needs {pip}: pip install {pip}") from e


# ---------------------------------------------------------------- optimizers
FUSED_DEVICES = {"cpu", "cuda"}


def _fusable(groups) -> bool:
    """torch's fused AdamW (one kernel for all tensors) handles floating tensors on the CPU
    and CUDA; elsewhere (or mixed) the per-tensor implementation runs."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg):
    """torch AdamW, fused where it can be: on a CPU the default is a Python loop over the
    tensors (~4x slower for a LoRA's ~100 tensors); the fused kernel computes the same update
    (equal up to float rounding order)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=_fusable(groups) or None)


@OPTIMIZERS.register("adamw8bit")
def _adamw8bit(groups, cfg):
    bnb = _needs("bitsandbytes", "adamw8bit", "bitsandbytes")
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("lion8bit")
def _lion8bit(groups, cfg):
    """Lion (Chen et al. 2023) with 8-bit state. Lion's update has unit size per element,
    so it wants a ~3-10x smaller lr and ~3-10x larger weight decay than AdamW."""
    bnb = _needs("bitsandbytes", "lion8bit", "bitsandbytes")
    return bnb.optim.Lion8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("prodigy")
def _prodigy(groups, cfg):
    """Prodigy (Mishchenko & Defazio 2023) estimates the step size itself: ``optim.lr`` is a
    multiplier of its estimate and should be 1.0 (warned below 0.1)."""
    prodigyopt = _needs("prodigyopt", "prodigy", "prodigyopt")
    if cfg.lr < 0.1:
        log.warning("optimizer 'prodigy' with optim.lr=%g: Prodigy's lr multiplies its own step-size "
                    "estimate and is meant to be 1.0; set optim.lr=1.0", cfg.lr)
    return prodigyopt.Prodigy(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                              d_coef=cfg.prodigy_d_coef, safeguard_warmup=cfg.prodigy_safeguard_warmup)


@OPTIMIZERS.register("adafactor")
def _adafactor(groups, cfg):
    """transformers' Adafactor with a fixed lr (no relative step, no parameter scaling,
    no warmup init), so ``optim.lr`` and the schedule mean what they say."""
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, relative_step=False,
                     scale_parameter=False, warmup_init=False)


@OPTIMIZERS.register("adamw_schedulefree")
def _adamw_schedulefree(groups, cfg):
    """Schedule-free AdamW (Defazio et al. 2024, ``schedulefree`` package). It replaces the
    decay schedule (use ``optim.schedule='constant'``; warmup is ours). Its parameters hold
    the training point in ``train()`` mode and the averaged point in ``eval()`` mode:
    ``ScheduleFreeModeCallback`` switches between them around every step."""
    sf = _needs("schedulefree", "adamw_schedulefree", "schedulefree")
    if cfg.schedule != "constant":
        raise ValueError(f"optim.optimizer='adamw_schedulefree' replaces the lr schedule; set optim.schedule='constant' "
                         f"(got {cfg.schedule!r}; warmup_steps still applies)")
    return sf.AdamWScheduleFree(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, warmup_steps=0)


# ---------------------------------------------------------------- schedules
def _warmup(step: int, cfg: OptimConfig) -> float | None:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    return None


def _progress(step: int, total: int, cfg: OptimConfig) -> float:
    span = max(1, total - cfg.warmup_steps)
    return min(1.0, max(0.0, (step - cfg.warmup_steps) / span))


def _shaped(shape: Callable[[float, OptimConfig], float]) -> Schedule:
    """Warmup, then ``r + (1-r)·shape(p, cfg)`` (see the module docstring)."""

    def schedule(step: int, total: int, cfg: OptimConfig) -> float:
        w = _warmup(step, cfg)
        if w is not None:
            return w
        r = cfg.min_lr_ratio
        return r + (1 - r) * shape(_progress(step, total, cfg), cfg)

    schedule.__doc__ = shape.__doc__
    return schedule


def _half_cosine(x: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * x))


def _constant(p, cfg):
    """s = 1."""
    return 1.0


def _linear(p, cfg):
    """s = 1 - p."""
    return 1.0 - p


def _cosine(p, cfg):
    """s = ½(1 + cos πp)."""
    return _half_cosine(p)


def _cosine_with_restarts(p, cfg):
    """``num_cycles`` hard restarts: s = ½(1 + cos(π·frac(n·p))), and 0 at p = 1."""
    if p >= 1.0:
        return 0.0
    return _half_cosine((cfg.num_cycles * p) % 1.0)


def warm_restart_position(p: float, cycles: int, mult: float) -> tuple[int, float]:
    """(cycle k, fraction in it) for progress p when cycle k lasts L·multᵏ and the
    ``cycles`` cycles fill the run: L = 1/Σₖ multᵏ."""
    lengths = [mult**k for k in range(cycles)]
    pos = p * sum(lengths)
    for k, length in enumerate(lengths):
        if pos < length or k == cycles - 1:
            return k, min(1.0, pos / length)
        pos -= length
    return cycles - 1, 1.0


def _cosine_annealing_warm_restarts(p, cfg):
    """SGDR (Loshchilov & Hutter 2017): ``num_cycles`` cosine cycles, each ``cycle_mult``
    times longer than the last, the k-th peaking at ``cycle_gammaᵏ``:
    s = γᵏ·½(1 + cos(π·f)) with f the fraction of cycle k done."""
    k, f = warm_restart_position(p, cfg.num_cycles, cfg.cycle_mult)
    return cfg.cycle_gamma**k * _half_cosine(f)


def _polynomial(p, cfg):
    """s = (1 - p)^power."""
    return (1.0 - p) ** cfg.power


for _name, _shape in [("constant", _constant), ("linear", _linear), ("cosine", _cosine),
                      ("cosine_with_restarts", _cosine_with_restarts),
                      ("cosine_annealing_warm_restarts", _cosine_annealing_warm_restarts),
                      ("polynomial", _polynomial)]:
    SCHEDULES.add(_name, _shaped(_shape))


# ---------------------------------------------------------------- parameter groups
@PARAM_GROUPS.register("single")
def _single_group(network, cfg):
    return [{"params": list(network.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "lora"}]


@PARAM_GROUPS.register("loraplus")
def _loraplus_groups(network, cfg):
    """LoRA+ (Hayou et al. 2024): B matrices train at ``lr·loraplus_lr_ratio``, A at ``lr``.

    The network's algorithm says which parameters are the B side (``loraplus_split``; DoRA's
    magnitude trains at ``lr``); both groups use the configured weight decay. The schedule
    scales both groups alike, so the ratio holds throughout.
    """
    a, b = network.loraplus_split()
    if not b:
        raise ValueError("optim.loraplus_lr_ratio is set but this network's algorithm has no B side for LoRA+")
    ratio = cfg.loraplus_lr_ratio or 1.0
    return [{"params": a, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "lora_A"},
            {"params": b, "lr": cfg.lr * ratio, "weight_decay": cfg.weight_decay, "name": "lora_B"}]


def build_optimizer(network, cfg: OptimConfig, grouping: str = "single") -> torch.optim.Optimizer:
    groups = PARAM_GROUPS.get(grouping)(network, cfg)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    schedule = SCHEDULES.get(cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total_steps, cfg))


def grad_norm_clip(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip in place when ``max_norm > 0``; return the pre-clip total norm as a 0-d tensor on
    the gradients' device (no host-device sync; the caller fetches it with its other logs)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))


class ScheduleFreeModeCallback:
    """A loop callback (duck-typed: ``loop`` imports this module) for schedule-free
    optimizers: ``optimizer.train()`` before each step, ``optimizer.eval()`` after it and at
    the end, so every other callback (EMA, saving, previews) sees the averaged weights."""

    end_phase = "prepare"  # before the LoRA is saved
    all_ranks = True  # switches the weights every rank trains on

    def on_train_start(self, state) -> None:
        state.optimizer.eval()

    def on_step_start(self, state) -> None:
        state.optimizer.train()

    def on_step_end(self, state, logs: dict) -> None:
        state.optimizer.eval()

    def on_train_end(self, state, reason: str) -> None:
        state.optimizer.eval()
