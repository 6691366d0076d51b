"""One call that trains a LoRA: data → cache → inject → loop → files.

``train_lora`` is what the command line and the ComfyUI Trainer node call. Everything
host-specific arrives as arguments: the model adapter, the codec and text encoder, a
``release_encoders`` hook (free them once the dataset is cached), a ``progress`` callable
and a ``should_stop`` callable (ComfyUI's Cancel, a signal, a control file).
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import FORMAT_VERSION, assemble
from .checkpoint import Checkpoint, CheckpointCallback, StepSeedCallback, latest_checkpoint, restore
from .config import TrainingConfig
from .control import ControlCallback, DatasetWatchCallback, folder_snapshot
from .data.dataset import prepare_dataset
from .flow import step_generator
from .loop import Callback, LossTerm, NonFiniteLoss, RunState, run_loop
from .lora.formats import LORA_FORMATS
from .lora.io import build_metadata, save_lora_file
from .lora.network import LoraNetwork
from .models.common import module_device, resolve_compile
from .optim import build_optimizer, build_scheduler
from .report import write_learning_curve, write_state
from .resume import find_resume_point, is_finished
from .types import FlowModel, LatentCodec, TextEncoder

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ProgressFn = Callable[[int, int, dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path
    steps: int
    reason: str
    history: list[dict]
    network: LoraNetwork  # still injected: the model now carries the trained LoRA
    dataset_summary: dict[str, Any] = field(default_factory=dict)


def run_folder(config: TrainingConfig) -> Path:
    return Path(config.train.output_dir) / config.train.output_name


def target_regex(config: TrainingConfig, model: FlowModel) -> str:
    if config.lora.targets == "custom":
        return config.lora.target_regex
    return model.default_targets[config.lora.targets]


def save_lora(path: Path, network: LoraNetwork, model: FlowModel, config: TrainingConfig, steps: int,
              base_model: str = "") -> Path:
    tensors = LORA_FORMATS.get(model.lora_format).to_tensors(network, model)
    metadata = build_metadata(config, arch=model.arch, steps=steps, base_model=base_model,
                              trigger_word=config.data.captions.trigger_word)
    save_lora_file(path, tensors, metadata)
    return path


class ReportCallback(Callback):
    """Logs progress, and keeps ``training_state.json`` and ``learning_curve.svg`` current."""

    def __init__(self, run_dir: Path, progress: Optional[ProgressFn], every: int):
        self.run_dir, self.progress, self.every = run_dir, progress, every
        self.t0 = time.perf_counter()

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if self.progress is not None:
            self.progress(state.step, state.total_steps, logs)
        if state.step % self.every == 0 or state.step == state.total_steps:
            log.info("step %d/%d loss %.4f lr %.2e (%.2fs/step)", state.step, state.total_steps,
                     logs["loss"], logs["lr"], logs["seconds"])
        if state.step % max(self.every, 50) == 0:
            self.write(state, "running")

    def on_train_end(self, state: RunState, reason: str) -> None:
        self.write(state, reason)

    def write(self, state: RunState, status: str) -> None:
        extra = state.extra.get("curves", {})
        write_learning_curve(self.run_dir / "learning_curve.svg", state.history, extra)
        write_state(self.run_dir / "training_state.json", {
            "format_version": FORMAT_VERSION, "status": status, "step": state.step,
            "total_steps": state.total_steps, "losses": [h["loss"] for h in state.history],
            "config": state.config.to_dict(), "elapsed_s": time.perf_counter() - self.t0,
        })


class LoraSaveCallback(Callback):
    """Saves the LoRA every ``save_every`` steps and always at the end, including after a
    stop or an interrupt, so finished steps are never lost.

    With an EMA (``state.extra["ema"]``) and ``ema.use_for_output``, ``lora_final.safetensors``
    and ``checkpoint_*/lora.safetensors`` hold the EMA weights and the raw weights are
    written next to them as ``lora_final_raw.safetensors`` / ``checkpoint_*/lora_raw.safetensors``."""

    def __init__(self, run_dir: Path, every: int, base_model: str):
        self.run_dir, self.every, self.base_model = run_dir, every, base_model
        self.final_path = run_dir / "lora_final.safetensors"

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if self.every and state.step % self.every == 0 and state.step < state.total_steps:
            path = self.run_dir / f"checkpoint_{state.step:06d}" / "lora.safetensors"
            self.save(path, state)

    def save(self, path: Path, state: RunState) -> None:
        ema = state.extra.get("ema")
        if ema is None or not state.config.ema.use_for_output:
            save_lora(path, state.network, state.model, state.config, state.step, self.base_model)
            return
        save_lora(path.with_name(path.stem + "_raw" + path.suffix), state.network, state.model, state.config,
                  state.step, self.base_model)
        with ema.swapped_in():
            save_lora(path, state.network, state.model, state.config, state.step, self.base_model)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if state.step == 0:
            log.warning("training ended before the first step (%s); no LoRA written", reason)
            return
        self.save(self.final_path, state)
        log.info("saved %s after %d steps (%s)", self.final_path, state.step, reason)


def train_lora(
    config: TrainingConfig,
    model: FlowModel,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    *,
    run_dir: Optional[Path] = None,
    release_encoders: Optional[Callable[[], None]] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Callable[[], bool] = lambda: False,
    callbacks: Sequence[Callback] = (),
    extra_terms: Sequence[LossTerm] = (),
    base_model: str = "",
) -> TrainResult:
    """Train a LoRA on ``model`` as ``config`` says; write it under the run folder.

    The LoRA stays injected in ``model.module`` afterwards (``result.network.remove()``
    restores the base model)."""
    run_dir = Path(run_dir) if run_dir is not None else run_folder(config)
    model_info = {"arch": model.arch, "base_model": base_model, "lora_format": model.lora_format}
    resume_from = find_resume_point(run_dir, config, model_info)  # refuses unsafe changes before any work
    if resume_from is not None and is_finished(run_dir, resume_from, config.train.steps):
        return _finished_result(run_dir, config, model, resume_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_before = folder_snapshot(config.data.path) if config.data.path else {}
    write_state(run_dir / "config.json", {"format_version": FORMAT_VERSION, "config": config.to_dict()})
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / ".latent_cache"

    dataset = prepare_dataset(config.data, codec, text_encoder, cache_dir=cache_dir,
                              pixel_multiple=model.pixel_multiple, seed=config.train.seed,
                              extra_captions=assemble.extra_captions(config))
    if release_encoders is not None and not dataset.needs_codec:  # live augmentation encodes every step
        release_encoders()

    prepare = getattr(model, "prepare_for_training", None)
    if prepare is not None:
        prepare(dtype=DTYPES[config.train.precision], gradient_checkpointing=config.train.gradient_checkpointing)
    set_compile = getattr(model, "set_compile", None)
    compiled = resolve_compile(config.train.compile, module_device(model.module))
    if set_compile is not None:
        set_compile(compiled, fallback=config.train.compile == "auto")
    elif config.train.compile == "on":
        log.warning("train.compile=%s: this model (%s) has no compiled block path; training uncompiled",
                    config.train.compile, type(model).__name__)
    network = seeded_inject(config, model)
    optimizer = build_optimizer(network, config.optim, assemble.param_grouping(config))
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)
    state = RunState(config=config, model=model, network=network, optimizer=optimizer,
                     scheduler=scheduler, data=dataset, total_steps=config.train.steps)
    state.extra["run_dir"] = run_dir
    if resume_from is not None:
        _resume(state, resume_from)
    saver = LoraSaveCallback(run_dir, 0, base_model)  # lora_final; checkpoints come from `durability`
    terms = [*assemble.build_terms(config, model), *extra_terms]
    all_callbacks = [*assemble.build_callbacks(config, run_dir), *callbacks,
                     ReportCallback(run_dir, progress, config.train.log_every), saver]
    all_callbacks = durability_callbacks(config, run_dir, saver, should_stop, model_info, data_before, all_callbacks)
    log.info("training %d LoRA modules (%d parameters) for %d steps in %s",
             len(network.modules_trained()), sum(p.numel() for p in network.parameters()),
             config.train.steps, run_dir)
    reason = _run_guarded(state, terms, all_callbacks, should_stop, assemble.build_noise_fn(config), run_dir)
    return TrainResult(run_dir=run_dir, lora_path=saver.final_path, steps=state.step, reason=reason,
                       history=state.history, network=network, dataset_summary=dataset.summary())


# --------------------------------------------------------------------------- durability
def durability_callbacks(config: TrainingConfig, run_dir: Path, saver: LoraSaveCallback, should_stop, model_info: dict,
                         data_before: dict, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` wrapped with per-step seeding (first), then checkpoints, control files
    and the dataset watch (after the LoRA saver, so a checkpoint's files are complete)."""
    checkpointer = CheckpointCallback(run_dir, config.train.save_every, config.train.keep_checkpoints,
                                      write_loras=lambda st, folder: saver.save(folder / "lora.safetensors", st),
                                      meta={"model": model_info})
    tail: list[Callback] = [checkpointer, ControlCallback(run_dir, checkpointer.save, should_stop)]
    if config.data.path:
        tail.append(DatasetWatchCallback(config.data.path, data_before))
    return [StepSeedCallback(config.train.seed), *callbacks, *tail]


def seeded_inject(config: TrainingConfig, model: FlowModel) -> LoraNetwork:
    """Inject the LoRA with its random A init drawn from ``train.seed`` (not from whatever
    the global RNG holds), so two runs of one config start from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_generator(config.train.seed, 0, stream=StepSeedCallback.STREAM + 1).initial_seed())
        return LoraNetwork.inject(model.module, config.lora, target_regex(config, model))


def _resume(state: RunState, ckpt: Checkpoint) -> None:
    if state.config.ema.enabled and ckpt.doc.get("ema") is not None:
        from .ema import LoraEMA

        state.extra["ema"] = LoraEMA(state.network, state.config.ema)  # EmaCallback keeps an existing one
    restore(state, ckpt)


def _finished_result(run_dir: Path, config: TrainingConfig, model: FlowModel, ckpt: Checkpoint) -> TrainResult:
    """The run already trained ``train.steps`` with this config: load it, do not retrain."""
    log.info("%s already finished %d steps with this configuration; loading it instead of training again",
             run_dir, ckpt.step)
    network = seeded_inject(config, model)
    network.load_state_dict(ckpt.lora_state())
    return TrainResult(run_dir=run_dir, lora_path=run_dir / "lora_final.safetensors", steps=ckpt.step,
                       reason="already finished", history=list(ckpt.doc.get("history", [])), network=network)


def _run_guarded(state: RunState, terms, callbacks, should_stop, noise_fn, run_dir: Path) -> str:
    """``run_loop``, with a non-finite loss and a full disk turned into messages that say
    what was kept and what to do (the callbacks have already saved what could be saved)."""
    try:
        return run_loop(state, terms, callbacks, should_stop=should_stop, noise_fn=noise_fn,
                        backward=assemble.build_backward(state.config))
    except NonFiniteLoss as e:
        kept = latest_checkpoint(run_dir)
        raise NonFiniteLoss(f"training stopped: {e}. The last good state (step {state.step}) is kept in "
                            f"{kept or 'no checkpoint (no step finished)'}; lower optim.lr (or change precision) "
                            "and run again to resume from it") from e
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = latest_checkpoint(run_dir)
        raise OSError(errno.ENOSPC, f"disk full while saving in {run_dir} ({e}); the newest complete checkpoint "
                      f"{kept or '(none)'} is intact. Free space on that disk (or set train.output_dir elsewhere) "
                      "and run again to resume") from e
