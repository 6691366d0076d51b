"""The Trainer node: widgets → ``TrainingConfig`` → ``trainer_core.session.train_lora`` on
the MODEL ComfyUI already loaded (no second copy) → the trained LoRA as a file, a
LORA_MODEL, a MODEL with it applied and the loss curve.

The input MODEL is left as it was: the bridge trains the patcher's own module in place and
``result.network.remove()`` takes the LoRA layers out again; the MODEL output is a clone
patched with the saved file's tensors (``bridge.model_with_lora``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from comfy_api.latest import io, ui

from trainer_core.config import FlowConfig, LoRAConfig, OptimConfig, TrainConfig
from trainer_core.fingerprint import tensor_fingerprint

from . import specs
from .common import CATEGORY, Dataset, DopType, LoraConfigType, PreviewType, TrainingProgress, bounds, send_text, tip

log = logging.getLogger(__name__)


def base_model_identity(model_patcher) -> str:
    """A stable name for the MODEL being trained on: class, model type, a fingerprint of
    a few base weights and of any patches (another LoRA) already on it. Stored with the run
    so a run folder is never reused for a different base model."""
    base = model_patcher.model
    sd = base.diffusion_model.state_dict()
    names = sorted(sd)
    picked = [(n, sd[n]) for n in names[:4] + names[-4:]]
    patches = []
    for key in sorted(getattr(model_patcher, "patches", {}) or {}):
        for i, patch in enumerate(model_patcher.patches[key]):
            patches.extend((f"{key}#{i}#{patch[0]}#{patch[2]}", t) for t in _tensors_in(patch[1]))
    kind = f"{type(base).__name__}:{type(getattr(base, 'model_config', None)).__name__}"
    digest = tensor_fingerprint(picked + patches)
    return f"comfy:{kind}:{digest}:patches={len(model_patcher.patches or {})}"


def model_file_name(model_patcher) -> str:
    """The file the MODEL was loaded from (UNETLoader, CheckpointLoaderSimple), for the LoRA
    metadata's ``ss_sd_model_name``: ComfyUI keeps the loader call that can rebuild a patcher
    as ``cached_patcher_init = (loader, (path, ...))``. Empty when it is unknown."""
    init = getattr(model_patcher, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 else ()
    first = args[0] if isinstance(args, (tuple, list)) and args else None
    return os.path.basename(first) if isinstance(first, str) else ""


def _tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if depth > 4:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o, depth + 1)]
    weights = getattr(obj, "weights", None)
    return _tensors_in(weights, depth + 1) if weights is not None else []


def text_encoder(bridge, arch, clip, conditioning, dop: Optional[specs.DopSettings], trigger: str):
    """The engine's text encoder for this graph: the CLIP, else the fixed CONDITIONING."""
    if clip is not None and conditioning is not None:
        raise ValueError("connect either clip or conditioning to the FlowTrain Trainer, not both")
    if clip is not None:
        return bridge.ClipTextEncoder(clip, arch)
    if conditioning is None:
        raise ValueError("the FlowTrain Trainer needs a text encoder: connect a CLIP (DualCLIPLoader for FLUX.1, "
                         "CLIPLoader type flux2 for FLUX.2, type chroma for Chroma) or a CONDITIONING used for every caption")
    if dop is not None and dop.class_conditioning is not None and trigger:
        from trainer_core.data.captions import word_pattern

        pattern = word_pattern(trigger)  # captions without the trigger are DOP's class captions
        return bridge.FixedConditioningEncoder(conditioning, dop.class_conditioning,
                                               select=lambda text: "main" if pattern.search(text) else "class")
    return bridge.FixedConditioningEncoder(conditioning)


def release(vae, clip, encoder, *, clip_users: Sequence[str] = ()) -> None:
    """Once the dataset is cached: the VAE's and the CLIP's weights leave the accelerator
    (ComfyUI unloads them, clones included; the VAE reloads for previews) and the encoder
    drops its CLIP (previews read the cached prompt embeddings, they need no CLIP).

    What cannot be freed here: the CLIP and VAE objects, which ComfyUI's node output cache
    keeps while the graph holds them (on a CPU their weights stay in RAM). Logged once,
    naming the other nodes that use the same CLIP (``clip_users``)."""
    import comfy.model_management as mm

    getattr(encoder, "release", lambda: None)()
    patchers = [p for p in (getattr(o, "patcher", None) for o in (vae, clip)) if p is not None]
    freed: dict[str, int] = {}
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        patcher = loaded.model
        if patcher is None or not any(patcher is p or patcher.is_clone(p) for p in patchers):
            continue
        device = str(loaded.device)
        freed[device] = freed.get(device, 0) + int(patcher.loaded_size())
        loaded.model_unload()
        mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()
    on_accelerator = {d: b for d, b in freed.items() if not d.startswith("cpu")}
    if on_accelerator:
        log.info("text encoder and VAE unloaded before training: %s", ", ".join(
            f"{b / 2**20:.0f} MiB off {d}" for d, b in on_accelerator.items()))
    else:
        log.info("text encoder and VAE: no weights on an accelerator to unload")
    if clip is not None:
        also = f"; nodes {', '.join(clip_users)} use it too (it reloads for them)" if clip_users else ""
        log.info("the CLIP's weights stay in RAM while ComfyUI caches its loader's output%s. The Trainer holds no "
                 "reference to it any more: previews use the cached prompt embeddings", also)


def clip_users(prompt: Optional[dict], node_id: Optional[str]) -> list[str]:
    """Other nodes of the queued graph fed by the same CLIP output as this Trainer."""
    if not prompt or node_id is None or str(node_id) not in prompt:
        return []
    link = prompt[str(node_id)].get("inputs", {}).get("clip")
    if not isinstance(link, list) or len(link) != 2:
        return []
    same = lambda v: isinstance(v, list) and len(v) == 2 and [str(v[0]), int(v[1])] == [str(link[0]), int(link[1])]  # noqa: E731
    return sorted(nid for nid, node in prompt.items()
                  if nid != str(node_id) and any(same(v) for v in node.get("inputs", {}).values()))


def preview_callbacks(model, vae, clip, conditioning, preview, trigger: str, node_id, output_dir: str) -> list:
    """The in-training preview callback (empty when previews are off). With a CLIP the
    prompts come from the run's cached embeddings (``previews.prompt_texts`` go to
    ``train_lora(prompts=...)``), so rendering never needs the CLIP."""
    from . import previews

    if preview is None or preview.every_n_steps < 1:
        return []
    conds = (previews.cached_conditionings(preview, trigger) if clip is not None
             else previews.fixed_conditionings(preview, conditioning))
    render = previews.comfy_renderer(model, vae, conds, preview)
    return [previews.preview_callback(render, preview, previews.announce(node_id, output_dir))]


def preview_prompts(preview, trigger: str) -> list[str]:
    """Texts the previews encode, cached with the captions (none when previews are off)."""
    from . import previews

    return previews.prompt_texts(preview, trigger) if preview is not None and preview.every_n_steps > 0 else []


def existing_lora_path(name: str) -> str:
    """The Trainer's ``existing_lora``: "" (none), a file name in ComfyUI's ``loras`` folders
    (as LoraLoader lists it) or a path."""
    import folder_paths

    name = name.strip()
    if not name:
        return ""
    found = folder_paths.get_full_path("loras", name)
    if found:
        return found
    if os.path.isfile(os.path.expanduser(name)):
        return os.path.expanduser(name)
    raise ValueError(f"existing_lora={name!r} is neither a file in models/loras nor a path to a file")


def loss_curve_tensor(history: list[dict]) -> torch.Tensor:
    from trainer_core.plot import image_to_array, loss_curve_image

    return torch.from_numpy(image_to_array(loss_curve_image(history)))[None]


def run_training(model, vae, clip, conditioning, dataset, lora_config, settings: specs.TrainerSettings,
                 dop=None, preview=None, node_id: Optional[str] = None, prompt: Optional[dict] = None):
    """Train; returns ``(TrainResult, trained MODEL, LoRA tensors)``. Raises ComfyUI's
    interrupt after a Cancel, whether the engine saw it between steps (``should_stop``), in
    a forward pass or in the final previews (their sampler raises it): the LoRA trained so
    far, a resumable checkpoint and the status "stopped" are saved first. A ``.stop`` file in
    the run folder ends training normally: the outputs hold the LoRA of the steps done."""
    import comfy.model_management as mm
    import folder_paths

    from trainer_core.lora.io import load_lora_file
    from trainer_core.session import train_lora

    from . import bridge

    progress = TrainingProgress(node_id, settings.steps)
    progress.phase("loading", 0, 0, {})
    arch = bridge.detect_arch(model)
    output_root = folder_paths.get_output_directory()
    config = specs.build_training_config(dataset, lora_config, settings, output_dir=os.path.join(output_root, "flowtrain"),
                                         compute_dtype=str(bridge.auto_compute_dtype(model.model)), dop=dop, preview=preview,
                                         init_from=existing_lora_path(settings.existing_lora))
    trigger = config.data.captions.trigger_word
    encoder = text_encoder(bridge, arch, clip, conditioning, dop, trigger)
    codec = bridge.VaeCodec(vae, model)
    callbacks = preview_callbacks(model, vae, clip, conditioning, config.preview, trigger, node_id, output_root)
    prompts = preview_prompts(config.preview, trigger) if clip is not None else []
    users = clip_users(prompt, node_id)
    result = None
    with bridge.training_model(model, gradient_checkpointing=settings.gradient_checkpointing,
                               precision=settings.precision, config=config) as flow_model:
        send_text(f"memory: {flow_model.memory_plan.summary()}", node_id)
        # once loaded: before, the weights may still carry a merged LoRA of another MODEL sharing
        # them (e.g. this node's own output, sampled by the previous prompt)
        identity = base_model_identity(model)
        try:
            result = train_lora(config, flow_model, codec, encoder,
                                release_encoders=lambda: release(vae, clip, encoder, clip_users=users),
                                progress=progress, phase_progress=progress.phase, prompts=prompts,
                                should_stop=mm.processing_interrupted, callbacks=callbacks,
                                base_model=identity, model_name=model_file_name(model),
                                memory_plan=flow_model.memory_plan)
        finally:
            if result is not None:
                result.network.remove()
    if result.reason == "stopped":
        mm.throw_exception_if_processing_interrupted()
    if not Path(result.lora_path).is_file():
        raise ValueError(f"training ended ({result.reason}) without writing {result.lora_path}")
    tensors, metadata = load_lora_file(str(result.lora_path))
    return result, bridge.model_with_lora(model, tensors), specs.LoraTensors(tensors, metadata)


class FlowTrainTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from trainer_core.flow import SIGMA_SCHEMES, WEIGHTINGS
        from trainer_core.models.families import supported_labels
        from trainer_core.optim import OPTIMIZERS, SCHEDULES

        return io.Schema(
            node_id="FlowTrainTrainer", display_name="FlowTrain Trainer", category=CATEGORY, is_output_node=True,
            description=(f"Trains a LoRA on the loaded MODEL ({supported_labels()}; no second copy) and outputs the MODEL with "
                         "it applied, the LoRA, its file path and the loss curve. Re-queueing an unchanged graph "
                         "reuses the finished run."),
            inputs=[
                io.Model.Input("model", tooltip=f"The model to train on ({supported_labels()}; UNETLoader / checkpoint loader). "
                               "It is left unchanged."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the dataset once (cached in the run folder)."),
                Dataset.Input("dataset", tooltip="Training images from FlowTrain Dataset (→ Bucketer → Caption Processor)."),
                LoraConfigType.Input("lora_config", tooltip="LoRA shape from FlowTrain LoRA Config."),
                io.Int.Input("steps", default=1000, **bounds(TrainConfig, "steps"), tooltip=tip(TrainConfig, "steps")),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=10.0, step=1e-5, round=1e-7,
                               tooltip=tip(OptimConfig, "lr")),
                io.Combo.Input("optimizer", options=OPTIMIZERS.names(), default="adamw", tooltip=tip(OptimConfig, "optimizer")),
                io.Combo.Input("schedule", options=SCHEDULES.names(), default="constant", tooltip=tip(OptimConfig, "schedule")),
                io.Int.Input("warmup_steps", default=0, **bounds(OptimConfig, "warmup_steps"),
                             tooltip=tip(OptimConfig, "warmup_steps")),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images per micro-batch (all from one bucket)."),
                io.Int.Input("gradient_accumulation", default=1, **bounds(OptimConfig, "grad_accum"),
                             tooltip=tip(OptimConfig, "grad_accum")),
                io.Combo.Input("sigma_scheme", options=SIGMA_SCHEMES.names(), default="sigmoid",
                               tooltip=tip(FlowConfig, "sigma_scheme")),
                io.Float.Input("sigmoid_mean", default=0.0, step=0.05, **bounds(FlowConfig, "sigmoid_mean"),
                               tooltip=tip(FlowConfig, "sigmoid_mean")),
                io.Float.Input("sigmoid_std", default=1.0, min=0.0, max=5.0, step=0.05, tooltip=tip(FlowConfig, "sigmoid_std")),
                io.Float.Input("shift", default=3.0, min=0.0, max=100.0, step=0.05, tooltip=tip(FlowConfig, "shift")),
                io.Combo.Input("loss_weighting", options=WEIGHTINGS.names(), default="none", tooltip=tip(FlowConfig, "weighting")),
                io.Float.Input("guidance", default=1.0, step=0.1, **bounds(FlowConfig, "guidance"),
                               tooltip=tip(FlowConfig, "guidance")),
                io.Combo.Input("precision", options=list(specs.PRECISIONS), default="auto", tooltip=specs.PRECISION_HELP),
                io.Combo.Input("gradient_checkpointing", options=list(specs.CHECKPOINTING), default="auto",
                               tooltip=specs.CHECKPOINTING_HELP),
                io.Combo.Input("memory_budget", options=list(specs.MEMORY_BUDGETS), default="auto",
                               tooltip=specs.MEMORY_BUDGET_HELP),
                io.Int.Input("seed", default=42, min=0, max=2**62, control_after_generate=False, tooltip=tip(TrainConfig, "seed")),
                io.Int.Input("save_every", default=250, **bounds(TrainConfig, "save_every"), tooltip=tip(TrainConfig, "save_every")),
                io.String.Input("output_name", default="flowtrain_lora", tooltip=tip(
                    TrainConfig, "output_name", "The run folder is <ComfyUI output>/flowtrain/<output_name>.")),
                io.String.Input("existing_lora", default="", tooltip=(
                    "Optional: continue from this LoRA, a file name in models/loras or a path (empty = start fresh). "
                    + tip(LoRAConfig, "init_from"))),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "Text encoder for the captions and the preview prompts. They are encoded once and cached in the "
                    "run folder (a re-queue or resume encodes only new text); then its weights leave the GPU and the "
                    "Trainer drops it. ComfyUI itself keeps the CLIP (in RAM) while the graph holds the loader's "
                    "output.")),
                io.Conditioning.Input("conditioning", optional=True, tooltip=(
                    "In place of the text encoder: every caption uses this CONDITIONING.")),
                DopType.Input("dop", optional=True, tooltip="Optional FlowTrain DOP Settings."),
                PreviewType.Input("preview", optional=True, tooltip="Optional FlowTrain Preview Settings (images while training)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained LoRA applied."),
                io.LoraModel.Output(display_name="LORA", tooltip="The trained LoRA (for Load LoRA Model / FlowTrain Save LoRA)."),
                io.String.Output(display_name="lora_path", tooltip="Path of the saved LoRA file in the run folder."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss and its moving average."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, output_name="flowtrain_lora", **_widgets):
        """After a ``.stop`` the node's outputs are cached like a finished run's; the run
        folder's state in the cache key makes queueing the graph again resume it."""
        import folder_paths

        return specs.unfinished_run_marker(Path(folder_paths.get_output_directory()) / "flowtrain" / output_name)

    @classmethod
    def execute(cls, model, vae, dataset, lora_config, clip=None, conditioning=None, dop=None, preview=None,
                **widgets) -> io.NodeOutput:
        settings = specs.TrainerSettings(**widgets)
        node_id = cls.hidden.unique_id
        result, trained, tensors = run_training(model, vae, clip, conditioning, dataset, lora_config, settings,
                                                dop=dop, preview=preview, node_id=node_id, prompt=cls.hidden.prompt)
        last = result.history[-1]["loss"] if result.history else float("nan")
        model_label = f" on {result.variant.variant.label}" if result.variant is not None else ""
        send_text(f"{result.reason}: {result.steps} steps{model_label}, loss {last:.4f} → {result.lora_path}", node_id)
        curve = loss_curve_tensor(result.history)
        return io.NodeOutput(trained, tensors, str(result.lora_path), curve, ui=ui.PreviewImage(curve, cls=cls))
