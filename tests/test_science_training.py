"""Short real training runs (tiny FLUX.1 demo parts, 64 px) with every optimizer, loss
type and training-science option: the loss stays finite and goes down, and the options
reach the step through their seams (terms, groups, callbacks, data stages)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core import assemble
from trainer_core.config import TrainingConfig
from trainer_core.data.dataset import prepare_dataset
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.dataset import write_demo_dataset
from trainer_core.demo.run import demo_parts
from trainer_core.demo.text import HashTextEncoder
from trainer_core.flow import interpolate, velocity_target
from trainer_core.losses import WaveletLoss
from trainer_core.session import train_lora

STEPS = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("science")
    write_demo_dataset(root / "data", size=64, count=3)  # 3 square images × 2 repeats
    return root


def _config(root, name, **sections) -> TrainingConfig:
    d = {
        "data": {"path": str(root / "data"), "batch_size": 6, "cache_dir": str(root / "cache"),
                 "buckets": {"resolutions": [64], "step": 16, "min_side": 16},
                 "captions": {"trigger_word": "sks"}},
        "lora": {"rank": 4, "alpha": 4.0, "targets": "attention"},
        # σ concentrated near 0.5 so consecutive step losses are comparable.
        "flow": {"sigma_scheme": "sigmoid", "sigmoid_std": 0.1},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "train": {"steps": STEPS, "precision": "fp32", "gradient_checkpointing": False, "save_every": 0,
                  "log_every": 1000, "output_dir": str(root / "out"), "output_name": name},
    }
    for section, values in sections.items():
        d[section] = {**d.get(section, {}), **values}
    return TrainingConfig.from_dict(d)


def _probe(model, batch) -> float:
    """MSE of the velocity at fixed σ and noise: the same numbers before and after."""
    g = torch.Generator().manual_seed(5)
    x0 = batch.latents.float()
    total = 0.0
    with torch.no_grad():
        for s in (0.3, 0.5, 0.7):
            noise = torch.randn(x0.shape, generator=g)
            sigma = torch.full((x0.shape[0],), s)
            v = model.velocity(interpolate(x0, noise, sigma), sigma, batch.text, 1.0)
            total += float(((v - velocity_target(x0, noise)) ** 2).mean())
    return total / 3


def _train(root, name, **sections):
    config = _config(root, name, **sections)
    model, codec, text = demo_parts()
    result = train_lora(config, model, codec, text)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, (name, first, last)
    return result, model, config


def _dataset(config, model):
    return prepare_dataset(config.data, DctCodec(), HashTextEncoder(), cache_dir=Path(config.data.cache_dir),
                           pixel_multiple=model.pixel_multiple, seed=config.train.seed)


def _probe_drops(result, model, config):
    batch = _dataset(config, model).batch(0, torch.Generator().manual_seed(0))
    after = _probe(model, batch)
    with result.network.disabled():
        before = _probe(model, batch)
    assert after < before, (before, after)


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("adamw8bit", 1e-2), ("prodigy", 1.0),
                                          ("adafactor", 1e-2), ("lion8bit", 3e-3), ("adamw_schedulefree", 1e-2)])
def test_every_optimizer_trains(data_dir, optimizer, lr):
    result, model, config = _train(data_dir, f"opt_{optimizer}", optim={"optimizer": optimizer, "lr": lr})
    _probe_drops(result, model, config)


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber", "smooth_l1"])
def test_every_loss_type_trains(data_dir, loss_type):
    _train(data_dir, f"loss_{loss_type}", loss={"loss_type": loss_type, "huber_c": 0.5, "huber_schedule": "snr"})


def test_all_options_reach_the_step_through_their_seams(data_dir):
    result, model, config = _train(
        data_dir, "everything",
        loss={"loss_type": "huber", "huber_schedule": "exponential", "min_snr_gamma": 5.0, "wavelet_loss": 1.0,
              "wavelet": "haar", "wavelet_levels": 2},
        flow={"noise_offset": 0.05, "pyramid_noise_discount": 0.5, "ip_noise_gamma": 0.1},
        optim={"loraplus_lr_ratio": 4.0, "schedule": "cosine_annealing_warm_restarts", "num_cycles": 2,
               "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_accum": 2},
        ema={"enabled": True, "decay": 0.9},
        data={"augment": {"flip": True}, "captions": {"trigger_word": "sks", "tag_dropout": 0.2,
                                                       "caption_dropout": 0.1, "caption_dropout_warmup_steps": 10}},
    )
    assert all(set(h["terms"]) == {"flow", "wavelet"} for h in result.history)
    # Logged after scheduler.step(): the lr of the next optimizer step, (1+1)/(2+1) of warmup.
    assert result.history[0]["lr"] == pytest.approx(1e-2 * 2 / 3)
    run = result.run_dir
    bins = json.loads((run / "loss_by_sigma.json").read_text())["bins"]
    ds = _dataset(config, model)
    samples = sum(len(ds.batch(i, torch.Generator().manual_seed(0)).sources) for i in range(STEPS * 2))
    assert sum(b["count"] for b in bins) == samples  # every sample of every micro-batch
    final, raw = load_file(run / "lora_final.safetensors"), load_file(run / "lora_final_raw.safetensors")
    assert final.keys() == raw.keys()
    assert any(not torch.equal(final[k], raw[k]) for k in final)  # EMA weights differ from the raw ones


def test_live_augmentation_keeps_the_encoders(data_dir):
    config = _config(data_dir, "live", data={"augment": {"random_crop": True, "color_jitter": True}})
    model, codec, text = demo_parts()
    released = []
    result = train_lora(config, model, codec, text, release_encoders=lambda: released.append(1))
    assert released == [] and len(result.history) == STEPS
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_wavelet_term_is_in_the_assembled_terms():
    cfg = TrainingConfig.from_dict({"loss": {"wavelet_loss": 0.3}})
    assert any(isinstance(t, WaveletLoss) and t.weight == 0.3 for t in assemble.build_terms(cfg, None))
