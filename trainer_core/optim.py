"""Optimizers, learning-rate schedules and parameter-group builders, by name.

Schedules are multipliers of the peak lr as a function of the *optimizer* step (not the
micro-step), so gradient accumulation never stretches a schedule.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .config import OptimConfig
from .registry import Registry

OptimizerFactory = Callable[[list[dict], OptimConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

Schedule = Callable[[int, int, OptimConfig], float]  # (step, total_steps, cfg) -> lr multiplier
SCHEDULES: Registry[Schedule] = Registry("lr schedule")

ParamGroupBuilder = Callable[[Any, OptimConfig], list[dict]]
PARAM_GROUPS: Registry[ParamGroupBuilder] = Registry("parameter grouping")


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg):
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw8bit")
def _adamw8bit(groups, cfg):
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # optional dependency: say how to get it
        raise RuntimeError("optim.optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from e
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _warmup(step: int, cfg: OptimConfig) -> float | None:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    return None


def _progress(step: int, total: int, cfg: OptimConfig) -> float:
    span = max(1, total - cfg.warmup_steps)
    return min(1.0, max(0.0, (step - cfg.warmup_steps) / span))


@SCHEDULES.register("constant")
def _constant(step, total, cfg):
    w = _warmup(step, cfg)
    return 1.0 if w is None else w


@SCHEDULES.register("linear")
def _linear(step, total, cfg):
    w = _warmup(step, cfg)
    return w if w is not None else 1.0 - _progress(step, total, cfg)


@SCHEDULES.register("cosine")
def _cosine(step, total, cfg):
    w = _warmup(step, cfg)
    return w if w is not None else 0.5 * (1 + math.cos(math.pi * _progress(step, total, cfg)))


@PARAM_GROUPS.register("single")
def _single_group(network, cfg):
    return [{"params": list(network.parameters()), "lr": cfg.lr, "name": "lora"}]


def build_optimizer(network, cfg: OptimConfig, grouping: str = "single") -> torch.optim.Optimizer:
    groups = PARAM_GROUPS.get(grouping)(network, cfg)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    schedule = SCHEDULES.get(cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total_steps, cfg))


def grad_norm_clip(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip in place when ``max_norm > 0``; return the pre-clip total norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
