"""Resumable checkpoints: everything needed to continue a run bit-exactly, with no pickle.

A checkpoint is a folder ``<run>/checkpoint_000250/`` holding

* ``lora.safetensors`` (and ``lora_ema.safetensors``): the LoRA as users load it;
* ``optimizer_state.safetensors``: every tensor of the training state under structured
  keys: ``lora.<param>`` (the exact trainable A/B), ``optimizer.*``, ``scheduler.*``,
  ``ema.*`` and ``rng.torch_cpu`` / ``rng.cuda.<i>`` (uint8 RNG states);
* ``training_state.json``: step, epoch and data position, the config, the losses so far,
  Python/numpy RNG states and the non-tensor skeletons of the optimizer, scheduler and
  EMA state dicts (a tensor leaf is ``{"__tensor__": key}``);
* ``WRITING``: written first (and removed after ``COMPLETE``), so the cleanup of incomplete
  checkpoints removes only folders a checkpoint write started, never anything else that
  happens to be named ``checkpoint_*`` (e.g. previews of an older FlowTrain);
* ``COMPLETE``: written last. Only a folder with it counts, so a crash or a full disk at
  any moment leaves either a complete checkpoint or one that is ignored and cleaned up.

Every file is written atomically (temp + fsync + rename, ``atomic.py``).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import FORMAT_VERSION
from .atomic import atomic_path, atomic_write_text
from .loop import Callback, RunState
from .phases import during

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
WRITING = "WRITING"
STATE_JSON = "training_state.json"
TENSORS = "optimizer_state.safetensors"
_NAME = re.compile(r"^checkpoint_(\d{6,})$")
LoraWriter = Callable[[RunState, Path], None]


# --------------------------------------------------------------------------- pure helpers
def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able skeleton of ``obj``; every tensor moves to ``tensors[<path>]`` and is
    replaced by ``{"__tensor__": <path>}``. Tuples, non-string dict keys and non-finite
    floats are tagged so ``unflatten`` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[flatten(k, f"{prefix}.k{i}", tensors), flatten(v, f"{prefix}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {prefix} of type {type(obj).__name__} (tensors, numbers, "
                    "strings, lists, tuples and dicts only; no pickle)")


def unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten``."""
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(unflatten(v, tensors) for v in skel["__tuple__"])
        if "__items__" in skel:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skel["__items__"]}
        if "__float__" in skel:
            return float(skel["__float__"])
        return {k: unflatten(v, tensors) for k, v in skel.items()}
    return skel


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:06d}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def list_checkpoints(run_dir: Path, *, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoint folders, oldest first; by default only complete ones."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted((s, p) for s, p in found if not complete or is_complete(p))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    done = list_checkpoints(run_dir)
    return done[-1][1] if done else None


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders whose write started (``WRITING``, or still empty) but never
    finished (no ``COMPLETE``: a crash or a full disk). Other incomplete ``checkpoint_*``
    folders were not written by the checkpoint writer (e.g. previews): kept, and ignored."""
    incomplete = [p for _, p in list_checkpoints(run_dir, complete=False) if not is_complete(p)]
    gone = [p for p in incomplete if (p / WRITING).is_file() or not any(p.iterdir())]  # empty: killed after mkdir
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    if gone:
        log.info("removed %d incomplete checkpoint folder(s): %s", len(gone), ", ".join(p.name for p in gone))
    kept = [p.name for p in incomplete if p not in gone]
    if kept:
        log.info("kept %d checkpoint_* folder(s) that hold no checkpoint (not written by a checkpoint save): %s",
                 len(kept), ", ".join(kept))
    return gone


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (0 = all); the newest is never deleted.
    ``COMPLETE`` goes first, so a crash mid-delete leaves an ignored folder, not a broken one."""
    done = list_checkpoints(run_dir)
    old = [p for _, p in done[:-keep]] if keep > 0 else []
    for p in old:
        (p / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return old


def rng_states() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/numpy states, torch RNG states as uint8 tensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return {"python": [version, list(mt), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}, tensors


def set_rng_states(states: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])


# --------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: Path, state: RunState, write_loras: LoraWriter, *, meta: Optional[dict] = None) -> Path:
    """Write the checkpoint of ``state.step`` (in place, ``COMPLETE`` last). A complete
    checkpoint of the same step is left as it is."""
    folder = checkpoint_dir(run_dir, state.step)
    if is_complete(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / WRITING, f"step {state.step}\n")  # first: marks the folder as ours to clean up
    t0 = time.perf_counter()
    write_loras(state, folder)
    tensors = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in state.network.state_dict().items()}
    skeletons = {"optimizer": flatten(state.optimizer.state_dict(), "optimizer", tensors),
                 "scheduler": flatten(state.scheduler.state_dict(), "scheduler", tensors)}
    ema = state.extra.get("ema")
    skeletons["ema"] = flatten(ema.state_dict(), "ema", tensors) if ema is not None else None
    rng_json, rng_tensors = rng_states()
    tensors.update(rng_tensors)
    with atomic_path(folder / TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    accum = state.config.optim.grad_accum
    per_epoch = getattr(state.data, "batches_per_epoch", 0)
    micro = state.step * accum
    doc = {"format_version": FORMAT_VERSION, "step": state.step, "total_steps": state.total_steps,
           "micro_index": micro, "epoch": micro // per_epoch if per_epoch else None,
           "batches_per_epoch": per_epoch, "config": state.config.to_dict(), "history": state.history,
           "rng": rng_json, **skeletons, **(meta or {})}
    atomic_write_text(folder / STATE_JSON, json.dumps(doc, sort_keys=True, default=str))
    atomic_write_text(folder / COMPLETE, f"step {state.step}\n")
    (folder / WRITING).unlink(missing_ok=True)
    log.info("checkpoint %s saved (%.2fs)", folder, time.perf_counter() - t0)
    return folder


@dataclass
class Checkpoint:
    folder: Path
    doc: dict  # training_state.json
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.doc["step"])

    def part(self, name: str) -> Any:
        skel = self.doc.get(name)
        return None if skel is None else unflatten(skel, self.tensors)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k[len("lora."):]: v for k, v in self.tensors.items() if k.startswith("lora.")}


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read a complete checkpoint folder; a clear ValueError for anything else."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete checkpoint (no {COMPLETE} file): it was being written "
                         "when the run stopped; resume from an earlier checkpoint_* folder")
    try:
        doc = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {folder} cannot be read ({e}); resume from an earlier checkpoint_* folder") from e
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"checkpoint {folder} has format_version {doc['format_version']}, newer than this "
                         f"FlowTrain ({FORMAT_VERSION}); update FlowTrain")
    return Checkpoint(folder, doc, tensors)


def restore(state: RunState, ckpt: Checkpoint) -> None:
    """Put the run back exactly where the checkpoint left it."""
    state.network.load_state_dict(ckpt.lora_state())
    state.optimizer.load_state_dict(ckpt.part("optimizer"))
    state.scheduler.load_state_dict(ckpt.part("scheduler"))
    ema, ema_state = state.extra.get("ema"), ckpt.part("ema")
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    elif ema is not None:
        log.warning("checkpoint %s has no EMA state; the EMA restarts from the current weights", ckpt.folder)
    state.step = ckpt.step
    state.history = list(ckpt.doc.get("history", []))
    set_rng_states(ckpt.doc["rng"], ckpt.tensors)


class CheckpointCallback(Callback):
    """Saves a checkpoint every ``every`` steps, on demand (``save``) and at the end of
    training whatever the reason (finished, stopped, interrupted, error), then prunes.

    After a non-finite loss the weights and optimizer are still those of the last
    completed step (the loop checks the loss before ``optimizer.step``), so saving
    ``state.step`` then is safe; after non-finite *weights* (``state.unsaveable``) nothing
    is saved and the newest (finite) checkpoint stays the newest. A step whose checkpoint
    exists is never written again.
    """

    end_phase = "save"

    def __init__(self, run_dir: Path, every: int, keep: int, write_loras: LoraWriter, meta: Optional[dict] = None):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.write_loras, self.meta = write_loras, meta or {}
        self.last_saved = -1
        self.failed = False

    def on_train_start(self, state: RunState) -> None:
        remove_incomplete(self.run_dir)
        for step, folder in list_checkpoints(self.run_dir):  # resumed from an older one: keep, but set aside
            if step > state.step:
                folder.rename(folder.with_name(f"{folder.name}.superseded-{int(time.time())}"))
                log.warning("%s is newer than the resume point (step %d); renamed it to *.superseded-*", folder, state.step)
        if is_complete(checkpoint_dir(self.run_dir, state.step)):
            self.last_saved = state.step

    def save(self, state: RunState) -> Path:
        if state.step == self.last_saved:
            return checkpoint_dir(self.run_dir, state.step)
        try:
            with during(state, "saving"):
                folder = save_checkpoint(self.run_dir, state, self.write_loras, meta=self.meta)
        except BaseException:
            self.failed = True  # do not try again at the end (a full disk stays full)
            partial = checkpoint_dir(self.run_dir, state.step)
            if not is_complete(partial):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        self.last_saved = state.step
        prune_checkpoints(self.run_dir, self.keep)
        return folder

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if self.every and state.step % self.every == 0:
            self.save(state)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if state.unsaveable:
            log.warning("no checkpoint written at the end: %s", state.unsaveable)
        elif state.step > 0 and not self.failed and state.step != self.last_saved:
            self.save(state)


class StepSeedCallback(Callback):
    """Seeds the global torch RNG (LoRA dropout, anything without its own generator) from
    (seed, step) before every step, so a resumed step k draws what an uninterrupted one does."""

    STREAM = 7
    all_ranks = True

    def __init__(self, seed: int):
        self.seed = seed

    def on_step_start(self, state: RunState) -> None:
        from .flow import step_generator

        torch.manual_seed(step_generator(self.seed, state.step, self.STREAM).initial_seed())
