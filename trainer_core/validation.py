"""Validation loss: the flow-matching MSE at fixed σ with fixed noise, on fixed images.

The training loss jumps with each step's random σ, noise and image; this one is measured
on the same inputs every time, so its curve shows learning (and over-fitting) directly.

* images: the validation split (``data/holdout.py``): ``validation.images`` images held
  out of ``data.path``, or the images of ``validation.path``; never trained on. Every entry
  (one image at one bucket) is used, with its first cached caption variant (the base
  caption: no shuffle, no dropout; with shuffle/tag-dropout on it is the first variant drawn);
  an edit dataset's entries bring their reference latents, which condition every prediction;
* σ: ``validation.sigmas``; noise: drawn once from ``step_generator(seed, 0, VALIDATION_STREAM)``,
  never from the training generators or the global RNG;
* loss per σ: ``mean((v̂(x_t, σ) - (ε - x0))²)`` over images and elements, plain MSE (no
  weighting, so it is comparable across configs); the reported value is its mean over σ.

Computed at step 0 (a baseline, before training) and every ``validation.every_n_steps``
steps under ``no_grad`` in eval mode (no LoRA dropout), with the EMA weights when the run
outputs them. Results go to ``state.extra["curves"]["validation"]`` as ``[(step, value)]``
(plotted in ``learning_curve.svg``) and ``<run>/validation.json`` with the per-σ values.

Best checkpoint (``validation.keep_best``): after a step whose validation loss is the lowest
so far, the LoRA the run outputs is saved to ``<run>/best/lora.safetensors`` (through
``state.extra["save_lora"]``, the session's saver) with ``best/best.json`` (step, loss);
a resumed run reads ``best.json`` back and only replaces it with a lower loss.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import FORMAT_VERSION
from .atomic import atomic_write_text
from .config import ValidationConfig
from .flow import interpolate, step_generator, velocity_target
from .loop import Callback, RunState
from .types import TextBatch

log = logging.getLogger(__name__)

BEST = "best"  # folder in the run dir holding the LoRA with the lowest validation loss
VALIDATION_STREAM = 11  # flow.step_generator stream: separate from training draws


@contextlib.contextmanager
def output_weights(state: RunState) -> Iterator[str]:
    """Evaluation mode with the weights the run outputs: the EMA's when ``state.extra``
    holds one (with ``swapped_in()``) and ``ema.use_for_output``, else the raw weights.
    Yields ``"ema"`` or ``"raw"``; the previous train/eval mode is restored on exit."""
    module = state.model.module
    was_training = module.training
    ema = state.extra.get("ema")
    use_ema = ema is not None and state.config.ema.use_for_output and hasattr(ema, "swapped_in")
    module.eval()
    try:
        with (ema.swapped_in() if use_ema else contextlib.nullcontext()), torch.no_grad():
            yield "ema" if use_ema else "raw"
    finally:
        module.train(was_training)


class ValidationSet:
    """Fixed (x0, caption, noise) per image; ``loss(model)`` → per-σ MSE ``[S]``."""

    def __init__(self, dataset: Any, cfg: ValidationConfig):
        entries = getattr(dataset, "entries", None)
        embeddings = getattr(dataset, "embeddings", None)
        if not entries or embeddings is None:
            raise ValueError(f"validation needs a CachedDataset (entries + embeddings); got {type(dataset).__name__}. "
                             "Set validation.every_n_steps=0 to train without a validation loss")
        self.cfg = cfg
        self.entries = list(entries)
        self.sigmas = torch.tensor(cfg.sigmas, dtype=torch.float32)
        g = step_generator(cfg.seed, 0, VALIDATION_STREAM)
        self.noise = [torch.randn((len(cfg.sigmas), *e.latent.shape), generator=g) for e in self.entries]
        self.texts = [TextBatch.collate([embeddings[e.texts[0]]] * len(cfg.sigmas)) for e in self.entries]
        self.sources = [str(e.source) for e in self.entries]

    @torch.no_grad()
    def loss(self, model: Any, guidance: float) -> torch.Tensor:
        """Per-σ MSE ``[S]`` averaged over the images. One forward of batch S per image."""
        total = torch.zeros(len(self.sigmas))
        for entry, noise, text in zip(self.entries, self.noise, self.texts):
            x0 = entry.latent.float().unsqueeze(0).expand_as(noise)
            x_t = interpolate(x0, noise, self.sigmas)
            refs = [r.float().unsqueeze(0).expand(len(self.sigmas), *r.shape) for r in entry.references]
            kwargs = {"references": refs} if refs else {}
            pred = model.velocity(x_t, self.sigmas, text, guidance, **kwargs).float().cpu()
            total += ((pred - velocity_target(x0, noise)) ** 2).flatten(1).mean(1)
        return total / len(self.entries)


class ValidationCallback(Callback):
    """Validation loss at step 0 and every ``cfg.every_n_steps`` steps (and the last)."""

    def __init__(self, cfg: ValidationConfig, data: Any = None):
        if cfg.every_n_steps < 1:
            raise ValueError("ValidationCallback needs validation.every_n_steps >= 1 (0 means off: do not add it)")
        self.cfg = cfg
        self.data = data
        self.vset: ValidationSet | None = None
        self.history: list[dict] = []
        self.best: tuple[int, float] | None = None  # (step, loss) of best/

    def on_train_start(self, state: RunState) -> None:
        data = self.data if self.data is not None else state.extra.get("validation_data")
        if data is None:
            raise ValueError("the validation loss needs a validation split (data/holdout.py split_validation): "
                             "state.extra['validation_data'] is not set")
        self.vset = ValidationSet(data, self.cfg)
        run_dir = state.extra.get("run_dir")
        if run_dir is not None and (Path(run_dir) / BEST / "best.json").is_file():
            doc = json.loads((Path(run_dir) / BEST / "best.json").read_text())
            self.best = (int(doc["step"]), float(doc["validation_loss"]))
        if state.step == 0:
            self.evaluate(state)

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if state.step % self.cfg.every_n_steps == 0 or state.step == state.total_steps:
            logs["validation"] = self.evaluate(state)

    def evaluate(self, state: RunState) -> float:
        with output_weights(state) as weights:
            per_sigma = self.vset.loss(state.model, state.config.flow.guidance)
        value = float(per_sigma.mean())
        state.extra.setdefault("curves", {}).setdefault("validation", []).append((state.step, value))
        self.history.append({"step": state.step, "loss": value, "per_sigma": per_sigma.tolist(), "weights": weights})
        log.info("step %d validation loss %.4f (per σ: %s)", state.step, value,
                 ", ".join(f"{s:g}: {v:.4f}" for s, v in zip(self.cfg.sigmas, per_sigma.tolist())))
        run_dir = state.extra.get("run_dir")
        if run_dir is not None:
            if self.cfg.keep_best and state.step > 0 and (self.best is None or value < self.best[1]):
                self.keep_best(state, Path(run_dir) / BEST, value)
            self.write(Path(run_dir) / "validation.json")
        return value

    def keep_best(self, state: RunState, folder: Path, value: float) -> None:
        save = state.extra.get("save_lora")
        if save is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save(folder / "lora.safetensors", state)
        atomic_write_text(folder / "best.json", json.dumps(
            {"format_version": FORMAT_VERSION, "step": state.step, "validation_loss": value}, indent=1))
        self.best = (state.step, value)
        log.info("step %d: lowest validation loss so far (%.4f); LoRA kept in %s", state.step, value, folder)

    def write(self, path: Path) -> None:
        doc = {"format_version": FORMAT_VERSION, "sigmas": list(self.cfg.sigmas), "seed": self.cfg.seed,
               "images": sorted(set(self.vset.sources)), "held_out": True,
               "note": "images never trained on; plain MSE on the velocity",
               "best": None if self.best is None else {"step": self.best[0], "loss": self.best[1]},
               "history": self.history}
        atomic_write_text(path, json.dumps(doc, indent=1))
