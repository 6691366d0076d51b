"""Loss terms: each is ``term(ctx) -> scalar tensor | None`` with a ``name`` for the logs.

The loop sums whatever terms it is given; a term that does not apply on a step returns
None. Elementwise losses and timestep weightings are registries, so a new one is a
function, not a branch in the loop.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .flow import WEIGHTINGS
from .registry import Registry

# (pred, target, sigma[B]) -> elementwise loss with pred's shape
Elementwise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_FUNCTIONS: Registry[Elementwise] = Registry("loss type")


# (huber_c, sigma[B]) -> c per sample
HuberSchedule = Callable[[float, torch.Tensor], torch.Tensor]
HUBER_SCHEDULES: Registry[HuberSchedule] = Registry("huber schedule")


@HUBER_SCHEDULES.register("constant")
def _huber_constant(c, sigma):
    return torch.full_like(sigma, c)


@LOSS_FUNCTIONS.register("mse")
def _mse(pred, target, sigma):
    return (pred - target) ** 2


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B]: the mean over every dim but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class FlowMatchingLoss:
    """The rectified-flow objective on the raw velocity: ``w(σ)·ℓ(v̂, ε - x0)`` per sample.

    Writes the per-sample losses (before weighting) to ``ctx.logs["per_sample"]`` so
    callbacks can log loss by σ.
    """

    name = "flow"

    def __init__(self, loss_type: str = "mse", weighting: str = "none",
                 extra_weights: Optional[list[Callable[[torch.Tensor], torch.Tensor]]] = None):
        self.elementwise = LOSS_FUNCTIONS.get(loss_type)
        self.weighting = WEIGHTINGS.get(weighting)
        self.extra_weights = extra_weights or []

    def __call__(self, ctx) -> torch.Tensor:
        pred = ctx.predict()
        per_sample = per_sample_mean(self.elementwise(pred.float(), ctx.target.float(), ctx.sigma))
        weights = self.weighting(ctx.sigma)
        for extra in self.extra_weights:
            weights = weights * extra(ctx.sigma)
        ctx.logs["per_sample"] = per_sample.detach()
        return (per_sample * weights.to(per_sample)).mean()
