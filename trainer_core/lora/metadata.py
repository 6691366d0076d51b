"""The kohya / modelspec metadata other tools read, and the sd-scripts file hashes.

``build_metadata`` (``lora/io.py``) writes our own ``flowtrain.*`` keys and the basic
``ss_*`` set; this module adds what sd-scripts writes for FLUX.1 and musubi-tuner for
FLUX.2 (the names and value formats are theirs; every value is a string):

* per variant (``models.variants``) and family (``models.families``): ``ss_base_model_version`` (``flux1``,
  ``flux_2_dev``, ``flux_2_klein_4b``, ``flux_2_klein_9b``), ``modelspec.architecture``
  (``flux-1-dev/lora``, ``Flux.2-klein-9b/lora``, ...), ``modelspec.implementation`` per family;
  an edit LoRA (``data.control_images``) carries the names of its family's ``edit_variant`` when
  it has one (FLUX.1: ``flux_kontext``, ``Flux.1-dev/lora``, as musubi-tuner writes Kontext LoRAs);
* the run (``RunInfo``): model file name, start / finish time, epoch, dataset facts
  (``ss_tag_frequency``, ``ss_dataset_dirs``, ``ss_num_train_images``, ``ss_bucket_info``);
* the settings: batch, warmup, precision, noise, loss and the FLUX keys
  (``ss_guidance_scale``, ``ss_timestep_sampling``, ``ss_discrete_flow_shift``, ``ss_model_type``);
* ``sshs_model_hash`` / ``sshs_legacy_hash`` (``with_hashes``), computed the way sd-scripts
  does: serialize the tensors with only the ``ss_*`` keys as metadata; the model hash is the
  sha256 of everything after the header (the tensor bytes), the legacy hash the first 8 hex
  digits of the sha256 of the 64 KiB at offset 1 MiB of that serialization (empty bytes when
  the file is shorter).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save as st_save

from ..config import TrainingConfig
from ..models.families import FAMILIES
from ..models.variants import VARIANTS, Detection, Variant

LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000

PRECISION_NAMES = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
"""``ss_mixed_precision`` as accelerate names it."""


@dataclass(frozen=True)
class DatasetFacts:
    """What sd-scripts records about the training images."""

    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> tag -> images
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> n_repeats, img_count
    num_images: int = 0  # distinct images
    num_samples: int = 0  # images × repeats (× resolutions): one epoch
    bucket_info: dict[str, Any] = field(default_factory=dict)
    batches_per_epoch: int = 0
    num_validation_images: int = 0


def dataset_facts(dataset: Any, validation: Any = None) -> DatasetFacts:
    """``DatasetFacts`` of a ``CachedDataset``. Tags: each image's caption variants split at
    the caption separator (``,``), each distinct tag counted once per image, per folder."""
    entries = list(getattr(dataset, "entries", []) or [])
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    seen: set[Path] = set()
    buckets: dict[tuple[int, int], int] = {}
    ar_errors = []
    for e in entries:
        buckets[e.bucket] = buckets.get(e.bucket, 0) + e.repeats
        if e.size[0] and e.size[1]:
            ar_errors.append(abs(e.size[0] / e.size[1] - e.bucket[0] / e.bucket[1]))
        if e.source in seen:
            continue
        seen.add(e.source)
        folder = Path(e.source).parent.name
        d = dirs.setdefault(folder, {"n_repeats": e.repeats, "img_count": 0})
        d["img_count"] += 1
        counts = tags.setdefault(folder, {})
        for tag in {t.strip() for text in e.texts for t in text.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    info = {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(buckets.items()))},
            "mean_img_ar_error": sum(ar_errors) / len(ar_errors) if ar_errors else 0.0}
    val_sources = {e.source for e in getattr(validation, "entries", []) or []}
    return DatasetFacts(tag_frequency=tags, dataset_dirs=dirs, num_images=len(seen),
                        num_samples=sum(e.repeats for e in entries), bucket_info=info,
                        batches_per_epoch=int(getattr(dataset, "batches_per_epoch", 0) or 0),
                        num_validation_images=len(val_sources))


@dataclass(frozen=True)
class RunInfo:
    """Facts about one run that the config does not hold."""

    variant: Optional[Detection] = None
    model_name: str = ""  # the base model's file name, as other tools show it
    started_at: float = field(default_factory=time.time)
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32 - 1))
    dataset: DatasetFacts = field(default_factory=DatasetFacts)


def variant_of(arch: str, run: Optional[RunInfo]) -> Variant:
    if run is not None and run.variant is not None:
        return run.variant.variant
    return VARIANTS[FAMILIES.get(arch).fallback_variant]


def named_variant(config: TrainingConfig, variant: Variant) -> Variant:
    """The variant whose names the LoRA carries: the family's ``edit_variant`` for an edit
    LoRA (``data.control_images``) when the family has one, else ``variant``."""
    edit = FAMILIES.get(variant.family).edit_variant
    return VARIANTS[edit] if config.data.control_images and edit else variant


def _s(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x) if isinstance(x, (dict, list)) else str(x)


def run_keys(config: TrainingConfig, arch: str, steps: int, run: Optional[RunInfo], resolution: int) -> dict[str, str]:
    """The kohya / modelspec keys beyond ``io.build_metadata``'s basic set."""
    run = run or RunInfo()
    variant = variant_of(arch, run)
    names = named_variant(config, variant)
    fam = FAMILIES.get(variant.family)
    c, d = config, run.dataset
    accum, batch = c.optim.grad_accum, c.data.batch_size
    per_epoch = max(1, d.batches_per_epoch)
    micro_total = c.train.steps * accum
    md: dict[str, Any] = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": run.started_at,
        "ss_training_finished_at": time.time(),
        "ss_epoch": math.ceil(steps * accum / per_epoch) if d.batches_per_epoch else 0,
        "ss_num_epochs": math.ceil(micro_total / per_epoch) if d.batches_per_epoch else 0,
        "ss_num_batches_per_epoch": d.batches_per_epoch,
        "ss_num_train_images": d.num_samples,
        "ss_num_train_items": d.num_samples,
        "ss_num_validation_images": d.num_validation_images,
        "ss_num_reg_images": 0,
        "ss_tag_frequency": d.tag_frequency,
        "ss_dataset_dirs": d.dataset_dirs,
        "ss_bucket_info": d.bucket_info,
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * accum,
        "ss_gradient_accumulation_steps": accum,
        "ss_gradient_checkpointing": c.train.gradient_checkpointing != "off",
        "ss_lr_warmup_steps": c.optim.warmup_steps,
        "ss_mixed_precision": PRECISION_NAMES.get(c.train.precision, c.train.precision),
        "ss_full_fp16": False,
        "ss_full_bf16": False,
        "ss_max_grad_norm": c.optim.max_grad_norm,
        "ss_text_encoder_lr": 0.0,
        "ss_cache_latents": not (c.data.augment.random_crop or c.data.augment.color_jitter),
        "ss_enable_bucket": True,
        "ss_bucket_no_upscale": not c.data.buckets.allow_upscale,
        "ss_min_bucket_reso": c.data.buckets.min_side,
        "ss_max_bucket_reso": c.data.buckets.max_side,
        "ss_flip_aug": c.data.augment.flip,
        "ss_color_aug": c.data.augment.color_jitter,
        "ss_random_crop": c.data.augment.random_crop,
        "ss_shuffle_caption": c.data.captions.shuffle,
        "ss_keep_tokens": c.data.captions.keep_tokens,
        "ss_caption_dropout_rate": c.data.captions.caption_dropout,
        "ss_caption_tag_dropout_rate": c.data.captions.tag_dropout,
        "ss_noise_offset": c.flow.noise_offset,
        "ss_multires_noise_discount": c.flow.pyramid_noise_discount,
        "ss_ip_noise_gamma": c.flow.ip_noise_gamma,
        "ss_min_snr_gamma": c.loss.min_snr_gamma,
        "ss_loss_type": {"mse": "l2", "smooth_l1": "smooth_l1"}.get(c.loss.loss_type, c.loss.loss_type),
        "ss_huber_schedule": c.loss.huber_schedule,
        "ss_huber_c": c.loss.huber_c,
        "ss_network_args": {"targets": c.lora.targets, **({"target_regex": c.lora.target_regex}
                                                          if c.lora.targets == "custom" else {})},
        "ss_training_comment": "trained with FlowTrain",
        # FLUX keys
        "ss_model_type": fam.kohya_model_type,
        "ss_guidance_scale": c.flow.guidance,
        "ss_timestep_sampling": c.flow.sigma_scheme,
        "ss_sigmoid_scale": 1.0,
        "ss_logit_mean": c.flow.sigmoid_mean,
        "ss_logit_std": c.flow.sigmoid_std,
        "ss_discrete_flow_shift": c.flow.shift,
        "ss_weighting_scheme": c.flow.weighting,
        "ss_model_prediction_type": "raw",
        # per variant
        "ss_base_model_version": names.base_model_version,
        "ss_sd_model_name": run.model_name,
        "modelspec.sai_model_spec": names.sai_model_spec or fam.sai_model_spec,
        "modelspec.architecture": names.architecture,
        "modelspec.implementation": fam.implementation,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now().astimezone().replace(microsecond=0).isoformat(),
        "modelspec.trigger_phrase": c.data.captions.trigger_word,
        "flowtrain.variant": variant.name,
    }
    if run.variant is not None:
        md["flowtrain.variant_detection"] = run.variant.describe()
    return {k: _s(v) for k, v in md.items()}


def _tensor_bytes(serialized: bytes) -> bytes:
    n = int.from_bytes(serialized[:8], "little")
    return serialized[8 + n:]


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash`` and ``sshs_legacy_hash`` (see the module docstring)."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=ss_only)
    model_hash = hashlib.sha256(_tensor_bytes(data)).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
