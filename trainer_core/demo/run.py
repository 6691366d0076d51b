"""The README's main job: a LoRA trained end to end on the embedded default.

Everything is built in code (no download): a FLUX.1-layout transformer with a few million
random weights, a DCT image codec whose latents decode to recognisable pictures, a hashing
text encoder, and a dozen generated images of one concept (the trigger word ``sks``).
Writes, under ``<output-dir>/<name>/``: ``lora_final.safetensors``, ``learning_curve.svg``,
``training_state.json`` and ``samples.png`` (trigger prompts before vs after training).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..models.diffusers_flux import DiffusersFlux1
from ..previews import PreviewCallback, demo_renderer
from ..session import train_lora
from .codec import DctCodec
from .dataset import sample_prompts, write_demo_dataset
from .grid import sample_images, save_grid
from .text import HashTextEncoder
from .tiny import tiny_flux1

log = logging.getLogger(__name__)

DEMO_SIZE = 128
SAMPLE_SEED = 1234

# The demo's settings, on top of TrainingConfig's defaults. A random base model learns
# from scratch here, so the learning rate is far above what a real FLUX LoRA wants.
DEMO_DEFAULTS = {
    "data": {"batch_size": 2,
             "buckets": {"resolutions": [DEMO_SIZE], "step": 16, "min_side": 64},
             "captions": {"trigger_word": "sks", "class_word": "object", "keep_tokens": 1}},
    "lora": {"rank": 16, "alpha": 16.0, "targets": "all"},
    "optim": {"lr": 2e-3, "warmup_steps": 20, "schedule": "cosine", "weight_decay": 0.0},
    "flow": {"sigma_scheme": "sigmoid"},
    "train": {"steps": 300, "precision": "fp32", "gradient_checkpointing": False,
              "save_every": 100, "log_every": 50, "output_name": "demo"},
    "preview": {"every_n_steps": 100, "width": DEMO_SIZE, "height": DEMO_SIZE, "guidance": 1.0,
                "prompts": ["sks, a red ring object on a blue background",
                            "sks, a red ring object on a white gradient background"]},
}


def demo_parts(seed: int = 0):
    """The embedded default: (model adapter, codec, text encoder)."""
    return DiffusersFlux1(tiny_flux1(seed=seed)), DctCodec(), HashTextEncoder()


def preview_callbacks(config, codec, text) -> list:
    """Previews (``<run>/baseline``, ``checkpoint_*``, ``final``) when preview.every_n_steps > 0."""
    p = config.preview
    if p.every_n_steps <= 0:
        return []
    render = demo_renderer(codec, text, p.prompts, config.data.captions.trigger_word, p.seed, p.steps,
                           (p.height, p.width))
    return [PreviewCallback(render, p.every_n_steps)]


def run_demo(args, *, stop: Callable[[], bool], progress, make_config) -> Path:
    config = make_config(args, DEMO_DEFAULTS)
    run_dir = Path(config.train.output_dir) / config.train.output_name
    data_dir = run_dir / "dataset"
    write_demo_dataset(data_dir, size=DEMO_SIZE)
    config = config.replace(data=_with_path(config.data, data_dir))
    model, codec, text = demo_parts()
    with_trigger, _ = sample_prompts()

    log.info("sampling 'before' images")
    before = sample_images(model, codec, text, with_trigger, seed=SAMPLE_SEED, size=(DEMO_SIZE, DEMO_SIZE))
    result = train_lora(config, model, codec, text, run_dir=run_dir, progress=progress, should_stop=stop,
                        callbacks=preview_callbacks(config, codec, text),
                        base_model="embedded tiny FLUX.1 (random weights)")
    log.info("sampling 'after' images")
    after = sample_images(model, codec, text, with_trigger, seed=SAMPLE_SEED, size=(DEMO_SIZE, DEMO_SIZE))
    reference = _reference_row(data_dir, codec, len(with_trigger))
    save_grid([reference, before, after], run_dir / "samples.png",
              labels=["training images", "before training", f"after {result.steps} steps"])
    first, last = result.history[0]["loss"], _tail_mean(result.history)
    log.info("loss %.4f -> %.4f (mean of last 20 steps)", first, last)
    log.info("run folder: %s\n  LoRA: %s\n  samples: %s\n  curve: %s", run_dir, result.lora_path,
             run_dir / "samples.png", run_dir / "learning_curve.svg")
    return run_dir


def _with_path(data_cfg, path: Path):
    import dataclasses

    return dataclasses.replace(data_cfg, path=str(path))


def _tail_mean(history: list[dict], n: int = 20) -> float:
    tail = history[-n:]
    return sum(h["loss"] for h in tail) / len(tail)


def _reference_row(data_dir: Path, codec, n: int) -> torch.Tensor:
    """The first ``n`` square training images through the codec, for comparison."""
    from ..data.images import image_to_tensor, load_image

    paths = sorted(p for p in data_dir.rglob("*.png"))
    images = []
    for p in paths:
        img = load_image(p)
        if img.size == (DEMO_SIZE, DEMO_SIZE):
            images.append(image_to_tensor(img))
        if len(images) == n:
            break
    with torch.no_grad():
        return codec.decode(codec.encode(torch.stack(images)))
