"""Turns a config into the pieces the loop runs: loss terms, noise, parameter groups and
callbacks. Each feature contributes through its own small function here, so the loop and
``session.train_lora`` never grow an ``if config.x`` chain."""
from __future__ import annotations

from typing import Any

from . import dop
from .config import TrainingConfig
from .ema import EmaCallback
from .loop import Backward, Callback, LossTerm, NoiseFn, sum_backward
from .losses import FlowMatchingLoss, SigmaBinsCallback, WaveletLoss
from .noise import make_noise_fn
from .optim import ScheduleFreeModeCallback
from .types import FlowModel
from .validation import ValidationCallback


def build_terms(config: TrainingConfig, model: FlowModel) -> list[LossTerm]:
    """The loss terms summed on every micro-step (a term may skip a step by returning None)."""
    loss, flow = config.loss, config.flow
    terms: list[LossTerm] = [FlowMatchingLoss(
        loss_type=loss.loss_type, weighting=flow.weighting, huber_c=loss.huber_c,
        huber_schedule=loss.huber_schedule, min_snr_gamma=loss.min_snr_gamma)]
    if loss.wavelet_loss > 0:
        terms.append(WaveletLoss(loss.wavelet_loss, loss.wavelet, loss.wavelet_levels))
    if config.dop.enabled:
        terms.append(dop.DifferentialOutputPreservation(config.dop.multiplier, config.dop.every_n_steps))
    return terms


def build_backward(config: TrainingConfig) -> Backward:
    """How a micro-step's terms become gradients: one summed backward, or PCGrad (DOP)."""
    return dop.pcgrad_backward if config.dop.enabled and config.dop.gradient_surgery else sum_backward


def build_noise_fn(config: TrainingConfig) -> NoiseFn:
    """Gaussian ε plus the optional offset / pyramid noise and input perturbation."""
    return make_noise_fn(config.flow)


def param_grouping(config: TrainingConfig) -> str:
    """Name of the ``optim.PARAM_GROUPS`` builder."""
    return "loraplus" if config.optim.loraplus_lr_ratio > 0 else "single"


def build_callbacks(config: TrainingConfig, run_dir: Any) -> list[Callback]:
    """Feature callbacks (EMA, validation, ...), run before reporting and saving.
    Order matters: schedule-free's eval() switch comes before the EMA reads the weights."""
    callbacks: list[Callback] = []
    if config.optim.optimizer == "adamw_schedulefree":
        callbacks.append(ScheduleFreeModeCallback())
    if config.ema.enabled:
        callbacks.append(EmaCallback(config.ema))
    callbacks.append(SigmaBinsCallback(config.loss.sigma_bins, every=max(50, config.train.log_every)))
    if config.validation.every_n_steps > 0:
        callbacks.append(ValidationCallback(config.validation))
    return callbacks


def extra_captions(config: TrainingConfig) -> dict:
    """Caption transforms whose embeddings the dataset must cache too (e.g. DOP's class captions)."""
    if not config.dop.enabled:
        return {}
    dop.warn_captions_without_trigger(config.data)
    return {dop.CLASS_TEXT: dop.class_caption_fn(config.data.captions, dop.class_word(config))}
