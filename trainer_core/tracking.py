"""Experiment tracking: TensorBoard event files (and wandb when configured).

``TensorBoardCallback`` writes ``<run>/tensorboard/events.out.tfevents.*`` through
``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package is installed
(``pip install tensorboard``; ``train.tensorboard`` turns it off):

* every step: ``loss/total``, ``loss/<term>`` for each loss term (``flow``, ``dop``, ...),
  ``lr``, ``grad_norm``; ``validation/loss`` when the validation loss was computed (and
  its step-0 baseline);
* every ``train.log_every`` steps (and at the end): ``loss_by_sigma/<lo>-<hi>``, the mean
  unweighted training loss of the samples whose σ fell in that bin since the last write
  (``loss.sigma_bins`` bins);
* preview images (``previews.py`` writes them to ``baseline/``, ``checkpoint_<step>/`` and
  ``final/``) as ``preview/<file name>`` at their step. Host callbacks that render
  previews must run before this one (``session.train_lora`` puts it after them).

A resumed run appends to the same folder; ``purge_step`` drops events logged after the
checkpoint it resumed from. One log line says where the files are and how to open them.

``WandbCallback`` logs the same scalars to Weights & Biases when the ``wandb`` package is
installed and ``WANDB_PROJECT`` is set (plumbing only: no images, no artifacts).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from .config import TrainingConfig
from .loop import Callback, RunState
from .previews import PREVIEW_DIR

log = logging.getLogger(__name__)



def step_scalars(logs: dict) -> dict[str, float]:
    """The per-step scalars both trackers log, by tag."""
    out = {"loss/total": float(logs["loss"]), "lr": float(logs["lr"])}
    for name, value in (logs.get("terms") or {}).items():
        out[f"loss/{name}"] = float(value)
    if logs.get("grad_norm") is not None:
        out["grad_norm"] = float(logs["grad_norm"])
    if logs.get("validation") is not None:
        out["validation/loss"] = float(logs["validation"])
    return out


class SigmaBins:
    """Mean per-sample loss per σ bin over a window of steps."""

    def __init__(self, bins: int):
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.sums, self.counts = [0.0] * self.bins, [0] * self.bins

    def add(self, sigmas: list[float], losses: list[float]) -> None:
        for s, v in zip(sigmas, losses):
            k = min(self.bins - 1, max(0, int(s * self.bins)))
            self.sums[k] += v
            self.counts[k] += 1

    def means(self) -> dict[str, float]:
        return {f"loss_by_sigma/{k / self.bins:.2f}-{(k + 1) / self.bins:.2f}": self.sums[k] / self.counts[k]
                for k in range(self.bins) if self.counts[k]}


class TensorBoardCallback(Callback):
    def __init__(self, run_dir: Path, every: int, sigma_bins: int):
        self.folder = Path(run_dir) / "tensorboard"
        self.every = max(1, every)
        self.bins = SigmaBins(sigma_bins)
        self.writer: Any = None

    def on_train_start(self, state: RunState) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # optional dependency
            log.info("no TensorBoard event files: %s (pip install tensorboard, or set train.tensorboard=false)", e)
            return
        self.writer = SummaryWriter(str(self.folder), purge_step=state.step if state.step > 0 else None)
        log.info("TensorBoard event files in %s; open them with: tensorboard --logdir %s", self.folder, self.folder)
        if state.step == 0:
            for step, value in state.extra.get("curves", {}).get("validation", []):
                if step == 0:  # the baseline before training (validation.ValidationCallback runs first)
                    self.writer.add_scalar("validation/loss", value, 0)
            self._previews("baseline", 0)

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if self.writer is None:
            return
        for tag, value in step_scalars(logs).items():
            self.writer.add_scalar(tag, value, state.step)
        if "sigma" in logs:
            self.bins.add(logs["sigma"], logs["per_sample"])
        if state.step % self.every == 0 or state.step == state.total_steps:
            self._flush_bins(state.step)
        self._previews(f"step_{state.step:06d}", state.step)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if self.writer is None:
            return
        self._flush_bins(state.step)
        if not reason.startswith("error"):
            self._previews("final", state.step)
        self.writer.close()
        self.writer = None

    def _flush_bins(self, step: int) -> None:
        for tag, value in self.bins.means().items():
            self.writer.add_scalar(tag, value, step)
        self.bins.reset()
        self.writer.flush()

    def _previews(self, folder_name: str, step: int) -> None:
        folder = self.folder.parent / PREVIEW_DIR / folder_name
        if not folder.is_dir():
            return
        import numpy as np
        from PIL import Image

        for path in sorted(folder.glob("*.png")):
            with Image.open(path) as img:
                self.writer.add_image(f"preview/{path.stem}", np.asarray(img.convert("RGB")), step, dataformats="HWC")


class WandbCallback(Callback):
    """Scalars to Weights & Biases (``project``: from ``WANDB_PROJECT``)."""

    def __init__(self, wandb: Any, project: str, config: TrainingConfig, run_dir: Path):
        self.wandb, self.project, self.config, self.run_dir = wandb, project, config, Path(run_dir)
        self.run: Any = None

    def on_train_start(self, state: RunState) -> None:
        self.run = self.wandb.init(project=self.project, name=self.config.train.output_name, dir=str(self.run_dir),
                                   config=self.config.to_dict(), resume="allow")
        log.info("logging to Weights & Biases project %s", self.project)

    def on_step_end(self, state: RunState, logs: dict) -> None:
        self.wandb.log(step_scalars(logs), step=state.step)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if self.run is not None:
            self.wandb.finish()
            self.run = None


def _wandb() -> Optional[Any]:
    try:
        import wandb
    except ImportError:  # optional dependency
        return None
    return wandb


def tracking_callbacks(config: TrainingConfig, run_dir: Path) -> list[Callback]:
    """TensorBoard (``train.tensorboard``) and wandb (installed and ``WANDB_PROJECT`` set)."""
    out: list[Callback] = []
    if config.train.tensorboard:
        out.append(TensorBoardCallback(run_dir, config.train.log_every, config.loss.sigma_bins))
    project = os.environ.get("WANDB_PROJECT", "")
    if project:
        wandb = _wandb()
        if wandb is None:
            log.warning("WANDB_PROJECT=%s is set but the wandb package is not installed; not logging to wandb", project)
        else:
            out.append(WandbCallback(wandb, project, config, run_dir))
    return out
