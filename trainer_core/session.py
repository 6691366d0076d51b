"""One call that trains a LoRA: data → cache → inject → loop → files.

``train_lora`` is what the command line and the ComfyUI Trainer node call. Everything
host-specific arrives as arguments: the model adapter, the codec and text encoder, a
``release_encoders`` hook (free them once the dataset is cached), a ``progress`` callable
(per step), a ``phase_progress`` callable (what the run is doing, with counts while it
caches: ``phases.py``) and a ``should_stop`` callable (ComfyUI's Cancel, a signal, a control
file). ``prompts`` (preview prompts, negatives) are encoded with the captions, through the
same content-keyed cache, and served from ``state.data.embeddings`` once the encoder is gone.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import FORMAT_VERSION, assemble, distributed, modelcard
from .checkpoint import Checkpoint, CheckpointCallback, StepSeedCallback, latest_checkpoint, restore
from .config import ConfigError, TrainingConfig
from .control import ControlCallback, DatasetWatchCallback, folder_snapshot
from .data.dataset import prepare_dataset
from .data.holdout import split_validation
from .flow import step_generator
from .loop import Callback, LossTerm, NonFiniteLoss, NonFiniteWeights, RunState, run_loop
from .lora.formats import LORA_FORMATS
from .lora.io import build_metadata, save_lora_file
from .lora.metadata import RunInfo, dataset_facts, with_hashes
from .lora.network import LoraNetwork
from .models.common import module_device, resolve_compile
from .models.variants import Detection
from .optim import build_optimizer, build_scheduler
from .phases import PhaseFn, PhaseReporter, StepRate, during
from .report import write_learning_curve, write_state
from .resume import find_resume_point, plan_resume
from .run_facts import detect_variant_logged, run_facts
from .tracking import tracking_callbacks
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
    variant: Optional[Detection] = None  # the detected base model variant


def run_folder(config: TrainingConfig) -> Path:
    return Path(config.train.output_dir) / config.train.output_name


def target_regex(config: TrainingConfig, model: FlowModel) -> str:
    if config.lora.targets == "custom":
        return config.lora.target_regex
    return model.default_targets[config.lora.targets]


def save_lora(path: Path, network: LoraNetwork, model: FlowModel, config: TrainingConfig, steps: int,
              base_model: str = "", run: Optional[RunInfo] = None) -> Path:
    tensors = LORA_FORMATS.get(model.lora_format).to_tensors(network, model)
    metadata = build_metadata(config, arch=model.arch, steps=steps, base_model=base_model,
                              trigger_word=config.data.captions.trigger_word, run=run)
    save_lora_file(path, tensors, with_hashes(tensors, metadata))
    return path


class ReportCallback(Callback):
    """Logs progress, and keeps ``training_state.json`` and ``learning_curve.svg`` current.
    The final status is written once the LoRA and checkpoint are saved (``record`` phase).
    ``progress`` gets the step's logs plus ``s_per_it`` and ``eta`` (seconds; None while
    unknown) from ``phases.StepRate``."""

    end_phase = "record"

    def __init__(self, run_dir: Path, progress: Optional[ProgressFn], every: int):
        self.run_dir, self.progress, self.every = run_dir, progress, every
        self.t0 = time.perf_counter()
        self.rate = StepRate()

    def on_step_end(self, state: RunState, logs: dict) -> None:
        paused_s = getattr(state.extra.get("phase"), "paused_s", 0.0)
        per_step, eta = self.rate(state.step, state.total_steps, paused_s, logs.get("seconds"))
        if self.progress is not None:
            self.progress(state.step, state.total_steps, {**logs, "s_per_it": per_step, "eta": eta})
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
            "dataset": state.data.summary() if hasattr(state.data, "summary") else {},  # skipped files + reasons
        })


class LoraSaveCallback(Callback):
    """Saves the LoRA every ``save_every`` steps and always at the end, including after a
    stop or an interrupt, so finished steps are never lost.

    With an EMA (``state.extra["ema"]``) and ``ema.use_for_output``, ``lora_final.safetensors``
    and ``checkpoint_*/lora.safetensors`` hold the EMA weights and the raw weights are
    written next to them as ``lora_final_raw.safetensors`` / ``checkpoint_*/lora_raw.safetensors``.
    Non-finite weights (``state.unsaveable``) are never written as ``lora_final``."""

    end_phase = "save"

    def __init__(self, run_dir: Path, every: int, base_model: str):
        self.run_dir, self.every, self.base_model = run_dir, every, base_model
        self.final_path = run_dir / "lora_final.safetensors"

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if self.every and state.step % self.every == 0 and state.step < state.total_steps:
            path = self.run_dir / f"checkpoint_{state.step:06d}" / "lora.safetensors"
            self.save(path, state)

    def save(self, path: Path, state: RunState) -> None:
        with during(state, "saving"):
            self._save(path, state)

    def _save(self, path: Path, state: RunState) -> None:
        ema, run = state.extra.get("ema"), state.extra.get("run_info")
        if ema is None or not state.config.ema.use_for_output:
            save_lora(path, state.network, state.model, state.config, state.step, self.base_model, run)
            return
        save_lora(path.with_name(path.stem + "_raw" + path.suffix), state.network, state.model, state.config,
                  state.step, self.base_model, run)
        with ema.swapped_in():
            save_lora(path, state.network, state.model, state.config, state.step, self.base_model, run)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if state.step == 0:
            log.warning("training ended before the first step (%s); no LoRA written", reason)
            return
        if state.unsaveable:
            log.warning("%s not written (%s); %s", self.final_path.name, state.unsaveable,
                        "the earlier one is kept" if self.final_path.is_file() else "there is none")
            return
        self.save(self.final_path, state)
        log.info("saved %s after %d steps (%s)", self.final_path, state.step, reason)


def check_before_loading(config: TrainingConfig, run_dir: Optional[Path] = None) -> None:
    """The checks that need no model, for a caller to run before an expensive model load:
    the data folder (exists, holds images, captions readable) and the run folder
    (``existing_run='refuse'``, settings changed in a way that makes resuming unsafe; the
    model identity is compared later, in ``train_lora``). Raises ValueError naming the fix."""
    from .data.scan import scan_folder

    scan_folder(config.data.path, config.data.captions.caption_extension)
    find_resume_point(Path(run_dir) if run_dir is not None else run_folder(config), config, {})


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
    prompts: Sequence[str] = (),
    phase_progress: Optional[PhaseFn] = None,
    model_name: str = "",
    memory_plan=None,
) -> TrainResult:
    """Train a LoRA on ``model`` as ``config`` says; write it under the run folder.

    ``base_model``: an identity of the base model (resuming refuses a different one);
    ``model_name``: its file name, as the LoRA metadata reports it (``ss_sd_model_name``).

    The LoRA stays injected in ``model.module`` afterwards (``result.network.remove()``
    restores the base model). Models with ``plan_memory`` (``BflFlux``) get a memory plan
    for ``config.memory`` (or ``memory_plan`` when the caller already made one) before the
    dataset is touched; a run that cannot fit raises ``budget.MemoryBudgetError`` there."""
    phase = PhaseReporter(phase_progress)
    phase("loading")
    variant = detect_variant_logged(model)
    config = run_facts(config, model, variant, model_name)  # config.json then says what ran
    model_name = model_name or config.model.file
    run_dir = Path(run_dir) if run_dir is not None else run_folder(config)
    model_info = {"arch": model.arch, "base_model": base_model, "lora_format": model.lora_format}
    dp = distributed.current()  # data parallel under torchrun (rank 0 decides and writes), else a no-op
    # refuses unsafe changes before any work
    resume_from, finished = dp.on_main(lambda: plan_resume(run_dir, config, model_info, dp.world_size))
    if finished:
        result = _finished_result(run_dir, config, model, resume_from)
        phase("done")
        return result
    init = check_adapter(config, model)  # refuses an unsaveable algorithm or a mismatched init_from before any work
    if config.data.control_images and not getattr(model, "supports_references", False):
        raise ConfigError(f"data.control_images trains an edit LoRA, but this model ({type(model).__name__}, "
                          f"{model.arch}) takes no reference images; use a FLUX.1 Kontext or FLUX.2 model")
    prepare = getattr(model, "prepare_for_training", None)
    if prepare is not None:
        prepare(dtype=DTYPES.get(config.train.precision), gradient_checkpointing=config.train.gradient_checkpointing)
    set_compile = getattr(model, "set_compile", None)
    compiled = resolve_compile(config.train.compile, module_device(model.module))
    if set_compile is not None:
        set_compile(compiled, fallback=config.train.compile == "auto")
    elif config.train.compile == "on":
        log.warning("train.compile=%s: this model (%s) has no compiled block path; training uncompiled",
                    config.train.compile, type(model).__name__)
    plan = memory_plan if memory_plan is not None else plan_for(config, model)  # refuses before any work
    data_before = folder_snapshot(config.data.path) if config.data.path else {}
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / ".latent_cache"

    # the run folder is made once the data passed its checks: a bad dataset leaves none behind
    with dp.main_first():  # rank 0 fills the caches, the other ranks read them
        dataset = prepare_dataset(dp.data_config(config.data), codec, text_encoder, cache_dir=cache_dir,
                                  pixel_multiple=model.pixel_multiple, seed=config.train.seed,
                                  extra_captions=assemble.extra_captions(config), prompts=prompts,
                                  progress=phase.counter())
        dataset, validation_data = split_validation(config, dataset, lambda data: prepare_dataset(
            data, codec, text_encoder, cache_dir=cache_dir, pixel_multiple=model.pixel_multiple, seed=config.train.seed))
    if dp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # "model": what the command line needs to find the same weights (``flowtrain train --config``)
        write_state(run_dir / "config.json", {"format_version": FORMAT_VERSION, "config": config.to_dict(),
                                              "model": {"file": model_name, "arch": model.arch}})
    if release_encoders is not None and not dataset.needs_codec:  # live augmentation encodes every step
        release_encoders()

    network = seeded_inject(config, model, init)
    if plan is not None:
        model.apply_memory_plan(plan)  # after the LoRA exists: only frozen weights stream
    optimizer = build_optimizer(network, config.optim, assemble.param_grouping(config))
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)
    state = RunState(config=config, model=model, network=network, optimizer=optimizer,
                     scheduler=scheduler, data=dataset, total_steps=config.train.steps)
    state.extra["run_dir"] = run_dir
    state.extra["phase"] = phase
    state.extra["validation_data"] = validation_data
    facts = dataset_facts(dataset, validation_data)
    state.extra["run_info"] = RunInfo(variant=variant, model_name=model_name, dataset=facts)
    if resume_from is not None:
        _resume(state, resume_from)
    dp.attach(state)
    saver = LoraSaveCallback(run_dir, 0, base_model)  # lora_final; checkpoints come from `durability`
    state.extra["save_lora"] = saver.save  # e.g. validation's best/
    terms = [*assemble.build_terms(config, model), *extra_terms]
    all_callbacks = [*assemble.build_callbacks(config, run_dir), *callbacks, *tracking_callbacks(config, run_dir),
                     ReportCallback(run_dir, progress, config.train.log_every), saver]
    all_callbacks = durability_callbacks(config, run_dir, saver, should_stop, model_info, data_before, all_callbacks)
    all_callbacks, should_stop = dp.wrap_callbacks(all_callbacks, should_stop)
    log.info("training %d LoRA modules (%d parameters) for %d steps in %s",
             len(network.modules_trained()), sum(p.numel() for p in network.parameters()),
             config.train.steps, run_dir)
    phase("training")
    try:
        reason = _run_guarded(state, terms, all_callbacks, should_stop, assemble.build_noise_fn(config), run_dir)
        if dp.is_main:
            modelcard.write_after_training(run_dir, config, saver.final_path, variant=variant, model_name=model_name,
                                           steps=state.step, reason=reason, history=state.history,
                                           dataset_summary={**dataset.summary(),
                                                            "validation_images": facts.num_validation_images})
    finally:
        phase("done")
    return TrainResult(run_dir=run_dir, lora_path=saver.final_path, steps=state.step, reason=reason,
                       history=state.history, network=network, dataset_summary=dataset.summary(), variant=variant)


def plan_for(config: TrainingConfig, model: FlowModel):
    """The memory plan of ``model`` for ``config`` (None for models without planning)."""
    planner = getattr(model, "plan_memory", None)
    if planner is None:
        return None
    plan = planner(config)
    log.info("memory: %s", plan.summary())
    return plan


# --------------------------------------------------------------------------- durability
def durability_callbacks(config: TrainingConfig, run_dir: Path, saver: LoraSaveCallback, should_stop, model_info: dict,
                         data_before: dict, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` wrapped with per-step seeding (first), then checkpoints, control files
    and the dataset watch (after the LoRA saver, so a checkpoint's files are complete). A save
    request (``.checkpoint``) also runs the ``on_save_now`` hooks of ``callbacks`` (previews)."""
    checkpointer = CheckpointCallback(run_dir, config.train.save_every, config.train.keep_checkpoints,
                                      write_loras=lambda st, folder: saver.save(folder / "lora.safetensors", st),
                                      meta={"model": model_info, **distributed.current().meta()})
    tail: list[Callback] = [checkpointer, ControlCallback(run_dir, checkpointer.save, should_stop, callbacks=callbacks)]
    if config.data.path:
        tail.append(DatasetWatchCallback(config.data.path, data_before))
    return [StepSeedCallback(config.train.seed), *callbacks, *tail]


def check_adapter(config: TrainingConfig, model: FlowModel):
    """Refuse an algorithm whose file ComfyUI could not load exactly for these layers, and
    read ``lora.init_from`` (returns its ``continuation.InitPlan``, or None)."""
    from .lora import continuation
    from .lora.network import matching_linears
    from .lora.records import fused_split_refusal

    regex = target_regex(config, model)
    why = fused_split_refusal(config.lora.algorithm, matching_linears(model.module, regex), model.bfl_name)
    if why:
        raise ValueError(why)
    return continuation.plan(config, model, regex) if config.lora.init_from else None


def seeded_inject(config: TrainingConfig, model: FlowModel, init=None) -> LoraNetwork:
    """Inject the LoRA with its random A init drawn from ``train.seed`` (not from whatever
    the global RNG holds), so two runs of one config start from the same weights; with
    ``init`` (``continuation.InitPlan``) it starts from that file's weights instead."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_generator(config.train.seed, 0, stream=StepSeedCallback.STREAM + 1).initial_seed())
        network = LoraNetwork.inject(model.module, config.lora, target_regex(config, model),
                                     ranks=init.ranks if init is not None else None)
    if init is not None:
        network.load_records(init.records)
    return network


def _resume(state: RunState, ckpt: Checkpoint) -> None:
    if state.config.ema.enabled and ckpt.doc.get("ema") is not None:
        from .ema import LoraEMA

        state.extra["ema"] = LoraEMA(state.network, state.config.ema)  # EmaCallback keeps an existing one
    restore(state, ckpt)


def _finished_result(run_dir: Path, config: TrainingConfig, model: FlowModel, ckpt: Checkpoint) -> TrainResult:
    """The run already trained ``train.steps`` with this config: load it, do not retrain."""
    log.info("%s already finished %d steps with this configuration; loading it instead of training again",
             run_dir, ckpt.step)
    network = seeded_inject(config, model, check_adapter(config, model))
    network.load_state_dict(ckpt.lora_state())
    return TrainResult(run_dir=run_dir, lora_path=run_dir / "lora_final.safetensors", steps=ckpt.step,
                       reason="already finished", history=list(ckpt.doc.get("history", [])), network=network)


def _run_guarded(state: RunState, terms, callbacks, should_stop, noise_fn, run_dir: Path) -> str:
    """``run_loop``, with a non-finite loss and a full disk turned into messages that say
    what was kept and what to do (the callbacks have already saved what could be saved)."""
    try:
        return run_loop(state, terms, callbacks, should_stop=should_stop, noise_fn=noise_fn,
                        backward=distributed.current().wrap_backward(assemble.build_backward(state.config)))
    except NonFiniteWeights as e:
        kept = latest_checkpoint(run_dir)
        final = run_dir / "lora_final.safetensors"
        raise NonFiniteWeights(
            f"training stopped: {e}. Nothing of that state was saved: the newest finite checkpoint is "
            f"{kept or 'none (no checkpoint was saved before it; set train.save_every to keep some)'}, and "
            f"{final.name} was not written ({'the earlier one in the run folder is kept' if final.is_file() else 'there is none'}). "
            "Lower optim.lr (or change train.precision) and run again to resume from that checkpoint") from e
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
