"""Shared parts for the DOP / validation / preview tests: a tiny real FLUX.1-layout model,
the demo's codec, text encoder and generated dataset, and a short ``train_lora`` run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from trainer_core.config import TrainingConfig
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.dataset import write_demo_dataset
from trainer_core.demo.text import HashTextEncoder
from trainer_core.models.diffusers_flux import DiffusersFlux1
from trainer_core.session import train_lora

SIZE = 64  # px: 8×8 latents, 16 image tokens


def tiny_model(seed: int = 0) -> DiffusersFlux1:
    """1 double + 1 single block, 2 heads × 16 dims, text width 64 (HashTextEncoder's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
            guidance_embeds=False)
    return DiffusersFlux1(module)


def write_data(folder: Path, count: int = 4) -> Path:
    write_demo_dataset(folder, size=SIZE, count=count)
    return folder


def make_config(data_dir: Path, steps: int = 4, **sections) -> TrainingConfig:
    """The tests' base config; ``sections`` deep-update it (``dop={"enabled": True}``)."""
    base = {
        "data": {"path": str(data_dir), "buckets": {"resolutions": [SIZE], "step": 16, "min_side": 16},
                 "captions": {"trigger_word": "sks", "class_word": "object"}},
        "lora": {"rank": 8, "alpha": 8.0, "targets": "all"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"steps": steps, "precision": "fp32", "gradient_checkpointing": False, "save_every": 0,
                  "log_every": 1000, "seed": 3},
    }
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                base.setdefault(name, {}).setdefault(key, {}).update(value)
            else:
                base.setdefault(name, {})[key] = value
    return TrainingConfig.from_dict(base)


def train(config: TrainingConfig, run_dir: Path, model: DiffusersFlux1 | None = None, callbacks=()):
    """``train_lora`` on the tiny parts; returns (result, model)."""
    model = model or tiny_model()
    result = train_lora(config, model, DctCodec(), HashTextEncoder(), run_dir=run_dir, callbacks=callbacks)
    return result, model


def lora_state(result) -> dict[str, torch.Tensor]:
    return result.network.state_dict()


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one CPU thread: with 2 threads torch 2.13's CPU layer_norm on these tiny
    tensors took ~6 ms a call on the 2-core test box (10 µs on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
