"""What a run records about itself before training: the model variant it detected, the preset
it applied, the precision ``auto`` became and the model file (``config.json`` then says what ran
and trains again unchanged).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from .config import TrainingConfig
from .models.common import module_device
from .models.variants import Detection, model_variant
from .types import FlowModel

log = logging.getLogger("trainer_core.session")


def resolved_precision(name: str, device: torch.device) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 where ``device`` computes bf16
    natively (a CUDA GPU that supports it, a CPU with bf16 oneDNN kernels), else fp32."""
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        native = False
    return "bf16" if native else "fp32"


def run_facts(config: TrainingConfig, model: FlowModel, variant: Optional[Detection], model_name: str) -> TrainingConfig:
    """``config`` as the run's ``config.json`` records it: the preset ``model.preset`` chooses
    applied (``presets.with_preset``: only to fields at their default, so applying it again, as
    to a node's config that already has it, changes nothing), ``auto`` precision resolved for
    the model's device, ``model.variant`` and ``model.file`` filled in when empty."""
    from . import presets

    config, name, kept = presets.with_preset(config, variant.variant.name if variant else None)
    if name:
        log.info("%s", presets.describe(config, name, kept, label=variant.variant.label if variant else name))
    precision = resolved_precision(config.train.precision, module_device(model.module))
    recorded = dataclasses.replace(config.model, variant=config.model.variant or (variant.variant.name if variant else ""),
                                   file=config.model.file or model_name)
    return config.replace(train=dataclasses.replace(config.train, precision=precision), model=recorded)


def detect_variant_logged(model: FlowModel) -> Optional[Detection]:
    """The base model's variant (``models.variants``), logged; None for a model whose
    shape cannot be read (the metadata then names only its family)."""
    try:
        found = model_variant(model)
    except (ValueError, AttributeError) as e:
        log.warning("cannot tell which %s variant this model is (%s); the LoRA metadata names only the family",
                    getattr(model, "arch", "?"), e)
        return None
    log.info("base model: %s", found.describe())
    return found
