"""The README's main job: a LoRA trained end to end on the embedded default.

Everything is built in code (no download): a FLUX.1-layout transformer with a few million
random weights, a DCT image codec whose latents decode to recognisable pictures, a hashing
text encoder, and a dozen generated images of one concept (the trigger word ``sks``).
Writes, under ``<output-dir>/<name>/``: ``lora_final.safetensors``, ``learning_curve.svg``,
``training_state.json`` and ``samples.png`` (trigger prompts before vs after training).

Measured (2 CPU cores, other load ≈ 1-2): the whole command takes ~60-85 s; 800 steps at
~0.06-0.08 s/step; loss (mean of the first vs last 20 steps) 4.9 → 0.29; share of the
object's red/yellow pixels (``dataset.concept_fraction``) in the trigger samples 3.8 %
before, 18.6 % after (training images 25.9 %).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..models.diffusers_flux import DiffusersFlux1
from ..previews import PreviewCallback, demo_renderer, prompt_texts
from ..session import train_lora
from .codec import DctCodec
from .dataset import concept_fraction, sample_prompts, write_demo_dataset
from .grid import sample_images, save_grid
from .text import HashTextEncoder
from .tiny import tiny_flux1

log = logging.getLogger(__name__)

DEMO_SIZE = 64  # px: 8×8 latents, 16 packed image tokens
SAMPLE_SEED = 1234
GRID_SCALE = 2  # samples.png shows each 64 px image at 128 px (nearest neighbour)

# Every Linear that has a BFL counterpart (all but ``norm_out.linear``, see lora.bfl_names):
# the attention/MLP layers of the ``all`` preset plus the embedders, the modulation layers
# and the final projection. On a random base those random maps are as much in the way as
# the blocks, and measured on this demo (600 steps) the ``all`` preset's loss stalls near
# 1.4 while this set reaches ~0.5 and draws the object.
DEMO_TARGETS = (
    r"(?!norm_out\.).*(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|net\.0\.proj|net\.2|proj_mlp"
    r"|proj_out|linear|linear_[12]|x_embedder|context_embedder)"
)

# The demo's settings, on top of TrainingConfig's defaults. A random base model learns
# from scratch here, so the learning rate is far above what a real FLUX LoRA wants, and
# the rank (64) is full rank for the 64-wide token input and output layers.
DEMO_DEFAULTS = {
    "data": {"batch_size": 8,
             "buckets": {"resolutions": [DEMO_SIZE], "step": 16, "min_side": 32},
             "captions": {"trigger_word": "sks", "class_word": "object", "keep_tokens": 1}},
    "lora": {"rank": 64, "alpha": 64.0, "targets": "custom", "target_regex": DEMO_TARGETS},
    "optim": {"lr": 1.5e-3, "warmup_steps": 20, "schedule": "cosine", "weight_decay": 0.0,
              "max_grad_norm": 0.0},  # clipping at 1 slows this from-scratch fit ~2×
    "flow": {"sigma_scheme": "sigmoid"},
    "train": {"steps": 800, "precision": "fp32", "gradient_checkpointing": "off",
              "save_every": 100, "log_every": 100, "output_name": "demo"},
    "preview": {"every_n_steps": 100, "width": DEMO_SIZE, "height": DEMO_SIZE, "guidance": 1.0,
                "prompts": ["sks, a red ring object on a blue background",
                            "sks, a red ring object on a white gradient background"]},
}


def demo_parts(seed: int = 0):
    """The embedded default: (model adapter, codec, text encoder)."""
    return DiffusersFlux1(tiny_flux1(seed=seed)), DctCodec(), HashTextEncoder()


def preview_callbacks(config, codec, text) -> list:
    """Previews (``<run>/previews/baseline``, ``step_*``, ``final``) when preview.every_n_steps > 0."""
    p = config.preview
    if p.every_n_steps <= 0:
        return []
    render = demo_renderer(codec, text, p.prompts, config.data.captions.trigger_word, p.seed, p.steps,
                           (p.height, p.width))
    return [PreviewCallback(render, p.every_n_steps)]


def preview_prompts(config) -> list[str]:
    """The preview prompts' texts, cached with the captions (none when previews are off)."""
    p = config.preview
    return prompt_texts(p.prompts, config.data.captions.trigger_word, negative=False) if p.every_n_steps > 0 else []


def single_thread_unless_asked() -> None:
    """Train the demo on one torch thread unless ``OMP_NUM_THREADS`` says otherwise.

    The demo's matrices are tiny (16 image tokens × 256), so a second thread helps little
    and hurts a lot when the other core is busy. Measured on 2 cores, 100 demo steps:
    other load ≈ 1 core: 1 thread 0.083 s/step, 2 threads 0.061; one more busy process
    (load ≈ 2): 1 thread 0.099, 2 threads 0.36; both cores busy (load ≈ 3): 1 thread
    0.043-0.09, 2 threads up to 1.8 (the threads spin-wait on each other).
    """
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        log.info("demo: 1 torch thread (set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(1)


def run_demo(args, *, stop: Callable[[], bool], progress, make_config, phase_progress=None) -> Path:
    config = make_config(args, DEMO_DEFAULTS)
    single_thread_unless_asked()
    run_dir = Path(config.train.output_dir) / config.train.output_name
    data_dir = run_dir / "dataset"
    dp = distributed.current()  # under torchrun: rank 0 writes the dataset and the samples
    with dp.main_first():
        if dp.is_main:
            # All square: 4:3 images would form their own small buckets, so batches shrink (on average
            # 4.8 instead of 8) and the 600-step loss ends near 0.9 instead of 0.5, too noisy to draw.
            write_demo_dataset(data_dir, size=DEMO_SIZE, mixed_sizes=False)
    config = config.replace(data=_with_path(config.data, data_dir))
    if dp.is_main:
        from ..data.overview import format_overview, overview

        log.info("%s", format_overview(overview(config.data)))
    model, codec, text = demo_parts()
    with_trigger, without_trigger = sample_prompts()

    if dp.is_main:
        log.info("sampling 'before' images")
        before = sample_images(model, codec, text, with_trigger, seed=SAMPLE_SEED, size=(DEMO_SIZE, DEMO_SIZE))
    result = train_lora(config, model, codec, text, run_dir=run_dir, progress=progress, should_stop=stop,
                        callbacks=preview_callbacks(config, codec, text), prompts=preview_prompts(config),
                        base_model="embedded tiny FLUX.1 (random weights)", phase_progress=phase_progress)
    if not dp.is_main:
        return run_dir
    log.info("sampling 'after' images")
    after = sample_images(model, codec, text, with_trigger, seed=SAMPLE_SEED, size=(DEMO_SIZE, DEMO_SIZE))
    reference = _reference_row(data_dir, codec, without_trigger)
    rows = [_enlarge(r) for r in (reference, before, after)]
    save_grid(rows, run_dir / "samples.png",
              labels=["training images", "before training", f"after {result.steps} steps"])
    scores = [float(concept_fraction(r).mean()) for r in (reference, before, after)]
    log.info("concept pixels (red/yellow): training images %.1f %%, before %.1f %%, after %.1f %%",
             *(100 * s for s in scores))
    if result.history:
        first, last = _head_mean(result.history), _tail_mean(result.history)
        log.info("loss %.4f -> %.4f (mean of the first vs last 20 steps)", first, last)
    log.info("run folder: %s\n  LoRA: %s\n  samples: %s\n  curve: %s", run_dir, result.lora_path,
             run_dir / "samples.png", run_dir / "learning_curve.svg")
    return run_dir


def _enlarge(images: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ×GRID_SCALE, so 64 px samples are visible in the grid."""
    return torch.nn.functional.interpolate(images, scale_factor=GRID_SCALE, mode="nearest")


def _with_path(data_cfg, path: Path):
    import dataclasses

    return dataclasses.replace(data_cfg, path=str(path))


def _head_mean(history: list[dict], n: int = 20) -> float:
    head = history[:n]
    return sum(h["loss"] for h in head) / len(head)


def _tail_mean(history: list[dict], n: int = 20) -> float:
    tail = history[-n:]
    return sum(h["loss"] for h in tail) / len(tail)


def _reference_row(data_dir: Path, codec, prompts: list[str]) -> torch.Tensor:
    """For each prompt, the first training image whose caption contains it (else the first
    square image), through the codec: what the samples should look like."""
    from ..data.images import image_to_tensor, load_image

    square = [p for p in sorted(data_dir.rglob("*.png")) if load_image(p).size == (DEMO_SIZE, DEMO_SIZE)]
    captions = {p: p.with_suffix(".txt").read_text(encoding="utf-8") for p in square}
    chosen = [next((p for p in square if prompt in captions[p]), square[0]) for prompt in prompts]
    with torch.no_grad():
        return codec.decode(codec.encode(torch.stack([image_to_tensor(load_image(p)) for p in chosen])))
