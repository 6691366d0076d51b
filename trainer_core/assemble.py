"""Turns a config into the pieces the loop runs: loss terms, noise, parameter groups and
callbacks. Each feature contributes through its own small function here, so the loop and
``session.train_lora`` never grow an ``if config.x`` chain."""
from __future__ import annotations

from typing import Any

from .config import TrainingConfig
from .loop import Callback, LossTerm, NoiseFn, gaussian_noise
from .losses import FlowMatchingLoss
from .types import FlowModel


def build_terms(config: TrainingConfig, model: FlowModel) -> list[LossTerm]:
    """The loss terms summed on every micro-step (a term may skip a step by returning None)."""
    return [FlowMatchingLoss(loss_type=config.loss.loss_type, weighting=config.flow.weighting)]


def build_noise_fn(config: TrainingConfig) -> NoiseFn:
    return gaussian_noise


def param_grouping(config: TrainingConfig) -> str:
    """Name of the ``optim.PARAM_GROUPS`` builder."""
    return "single"


def build_callbacks(config: TrainingConfig, run_dir: Any) -> list[Callback]:
    """Feature callbacks (EMA, validation, ...), run before reporting and saving."""
    return []


def extra_captions(config: TrainingConfig) -> dict:
    """Caption transforms whose embeddings the dataset must cache too (e.g. DOP's class captions)."""
    return {}
