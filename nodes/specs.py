"""The pure part of the nodes: the values that travel between FlowTrain nodes, and the
functions that turn widget values into the engine's ``TrainingConfig``.

Nothing here imports ComfyUI, so all of it is unit-tested without it
(``tests/test_node_specs.py``). The node modules only wire these to ComfyUI objects.

Values passed between nodes are frozen: ComfyUI caches node outputs and hands the same
object to every consumer, so a node must never mutate what it received.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from trainer_core.config import (
    BucketConfig,
    CaptionConfig,
    ConfigError,
    DataConfig,
    DopConfig,
    LoRAConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    PreviewConfig,
    TrainConfig,
    TrainingConfig,
    ValidationConfig,
    field_help,
    with_user_names,
)

LORA_SUFFIX = ".safetensors"


def sibling(name: str):
    """Another pure module of this folder (``settings``): imported from the package inside
    ComfyUI, by file path where this module itself was loaded by path (the unit tests)."""
    import importlib
    import sys

    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    key = f"flowtrain_node_{name}"
    if key not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# ----------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class DatasetSpec:
    """A scanned image folder plus how to bucket it and how to treat its captions.

    ``image_count``: usable images found; ``caption_count``: of those, how many have a
    caption file; ``samples_per_epoch``: images weighted by their ``N_name`` folder repeats;
    ``unreadable_count``: images skipped as unreadable; ``ignored_count``: other files and
    folders left out (other formats, animations, lonely captions, links out, 0_ folders);
    ``control_images``: an edit dataset (targets paired with reference images in control
    folders), ``reference_count``: its reference images."""

    path: str
    image_count: int
    caption_count: int
    samples_per_epoch: int
    caption_extension: str = ".txt"
    buckets: BucketConfig = field(default_factory=BucketConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    unreadable_count: int = 0
    ignored_count: int = 0
    strict: bool = False
    control_images: bool = False
    reference_count: int = 0

    def with_buckets(self, buckets: BucketConfig) -> "DatasetSpec":
        return dataclasses.replace(self, buckets=buckets)

    def with_captions(self, captions: CaptionConfig) -> "DatasetSpec":
        # the caption extension belongs to the folder scan, not to the caption policy
        return dataclasses.replace(self, captions=dataclasses.replace(captions, caption_extension=self.caption_extension))

    def data_config(self, batch_size: int) -> DataConfig:
        return DataConfig(path=self.path, batch_size=batch_size, buckets=self.buckets, captions=self.captions,
                          strict=self.strict, control_images=self.control_images)

    def describe(self) -> str:
        missing = self.image_count - self.caption_count
        text = (f"{self.image_count} images, {self.caption_count} captions, "
                f"{self.samples_per_epoch} samples per epoch (with repeats)")
        if self.control_images:
            text += f", {self.reference_count} reference images (edit pairs)"
        if missing:
            text += f"; {missing} without a caption (they train on the trigger/class word)"
        if self.unreadable_count:
            text += f"; {self.unreadable_count} unreadable image(s) skipped"
        if self.ignored_count:
            text += f"; {self.ignored_count} other file(s) ignored"
        if self.unreadable_count or self.ignored_count:
            text += " (the console log names each)"
        return text


def resolve_dataset_path(folder: str, input_dir: str) -> Path:
    """``folder`` as an absolute path: absolute paths are taken as they are, anything else
    is a subfolder of ComfyUI's input folder and must stay inside it."""
    text = folder.strip()
    if not text:
        raise ValueError("dataset folder is empty; give an absolute path or a subfolder of ComfyUI's input folder")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        base = Path(input_dir).resolve()
        path = (base / path).resolve()
        if base != path and base not in path.parents:
            raise ValueError(f"dataset folder {folder!r} leaves ComfyUI's input folder {base}; "
                             "use a subfolder name or an absolute path")
    if not path.is_dir():
        raise ValueError(f"dataset folder {path} does not exist or is not a folder; put your images "
                         "(with same-name .txt captions) there, or fix the folder widget")
    return path


def summarize_records(records: Iterable[Any]) -> tuple[int, int, int]:
    """(images, captions, samples per epoch) of ``scan_folder`` records."""
    records = list(records)
    return (len(records), sum(r.caption is not None for r in records), sum(r.repeats for r in records))


def dataset_spec(path: Path, caption_extension: str, strict: bool = False,
                 control_images: bool = False) -> DatasetSpec:
    """Survey ``path`` (headers only; the scan's warnings are logged) into a ``DatasetSpec``.
    Raises like training would: no usable image, no edit pair (``control_images``), or an
    unreadable image with ``strict``."""
    from trainer_core.data.survey import survey

    found = survey(path, caption_extension, strict=strict, controls=control_images)
    images, captions, samples = summarize_records(found.records)
    return DatasetSpec(path=str(path), image_count=images, caption_count=captions, samples_per_epoch=samples,
                       caption_extension=caption_extension, captions=CaptionConfig(caption_extension=caption_extension),
                       unreadable_count=len(found.unreadable), ignored_count=len(found.scan.skipped_files()),
                       strict=strict, control_images=control_images,
                       reference_count=sum(len(r.references) for r in found.records))


# ----------------------------------------------------------------------------- parsing
def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"512, 768 1024"`` → (512, 768, 1024); commas and/or spaces separate."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise ValueError(f"{what} is empty; give one or more whole numbers such as '512, 768'")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{what}={text!r} must be whole numbers separated by commas, e.g. '512, 768'") from None


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    """``"0, 0.5, 1.0"`` → (0.0, 0.5, 1.0)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise ValueError(f"{what} is empty; give numbers such as '0, 0.5, 1.0'")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{what}={text!r} must be numbers separated by commas, e.g. '0, 0.5, 1.0'") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}={text!r} contains a non-finite number")
    return values


def parse_prompts(text: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def trigger_variants(prompt: str, trigger: str) -> tuple[str, str]:
    """(prompt with the trigger, prompt without it), as the training previews pair them
    (``trainer_core.previews``): the trigger is prepended when missing and removed as a
    whole word for the second form, so the pair shows what the LoRA adds."""
    from trainer_core.previews import prompt_pairs

    return prompt_pairs([prompt], trigger)[0]


def safe_lora_filename(name: str) -> str:
    """A file name that stays inside the LoRA folder: no separators, no '..', not absolute,
    no control characters; '.safetensors' is added when missing."""
    text = name.strip()
    if text.lower().endswith(LORA_SUFFIX):
        text = text[: -len(LORA_SUFFIX)]
    bad = (not text or "/" in text or "\\" in text or ".." in text or os.path.isabs(name.strip())
           or text.startswith(".") or any(ord(c) < 32 for c in text) or ":" in text)
    if bad:
        raise ValueError(f"LoRA name {name!r} must be a plain file name (no folders, '..', ':' or leading '.'), "
                         "e.g. 'my_subject'")
    return text + LORA_SUFFIX


MEMORY_BUDGETS = ("auto", "8 GB", "12 GB", "16 GB", "24 GB", "48 GB", "unlimited")
MEMORY_BUDGET_HELP = (
    "Accelerator memory this run may use. auto: the free memory of the device minus a margin; a card size "
    "(8-48 GB): plan for that much (minus a 0.5 GB margin), e.g. to leave room for other work; unlimited: no plan "
    "(everything resident, checkpointing as the widget says). From the budget FlowTrain picks checkpointing and "
    "how many transformer blocks stream from CPU memory, and says what it chose before the first step; a run "
    "that cannot fit is refused before training, with the estimate and the change that makes it fit.")


def memory_config(choice: str) -> MemoryConfig:
    """The ``memory_budget`` widget → ``MemoryConfig`` ('unlimited' = a budget no run reaches, no streaming)."""
    if choice not in MEMORY_BUDGETS:
        raise ValueError(f"memory_budget={choice!r} is not one of {', '.join(MEMORY_BUDGETS)}")
    if choice == "auto":
        return MemoryConfig()
    if choice == "unlimited":
        return MemoryConfig(budget_gb=100_000.0, streaming="off")
    return MemoryConfig(budget_gb=float(choice.split()[0]))


def resolve_precision(choice: str, compute_dtype: str) -> str:
    """The config's precision for ``choice`` ('auto' or a config value) given the dtype
    ComfyUI computes this model in (e.g. 'float32', 'bfloat16'; fp8 weights compute in
    bf16/fp16/fp32): 'auto' trains in that compute dtype."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision={choice!r} is not one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice
    name = compute_dtype.replace("torch.", "")
    return {"float32": "fp32", "float16": "fp16"}.get(name, "bf16")


# ----------------------------------------------------------------------------- node settings
@dataclass(frozen=True)
class DopSettings:
    """DOP settings node output: the engine's ``DopConfig`` plus an optional class-word
    CONDITIONING (for graphs without a text encoder)."""

    config: DopConfig
    class_conditioning: Any = None


@dataclass(frozen=True)
class PreviewSettings:
    """Preview settings node output: the images rendered while training (the engine's
    ``PreviewConfig``) and how often the validation loss is computed (``ValidationConfig``)."""

    config: PreviewConfig = field(default_factory=PreviewConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def preview_settings(*, every_n_steps: int, prompts: str, seed: int, steps: int, width: int, height: int,
                     guidance: float, validation_every: int = 0, validation_images: int = 2) -> PreviewSettings:
    """The Preview settings node's widgets → ``PreviewSettings`` (``prompts``: one per line;
    ``validation_every`` → ``validation.every_n_steps``, 0 = off; ``validation_images`` →
    ``validation.images``, held out of the dataset)."""
    return PreviewSettings(
        PreviewConfig(every_n_steps=every_n_steps, prompts=parse_prompts(prompts), seed=seed, steps=steps,
                      width=width, height=height, guidance=guidance),
        ValidationConfig(every_n_steps=validation_every, images=validation_images))


@dataclass(frozen=True)
class TrainerSettings:
    """The Trainer node's training widgets, one field per widget. The rarer options are on
    the settings nodes (``nodes/settings.py``), which reach the Trainer as ``SettingsValues``."""

    preset: str = "auto"
    steps: int = 1000
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    batch_size: int = 1
    memory_budget: str = "auto"
    seed: int = 42
    save_every: int = 250
    output_name: str = "flowtrain_lora"
    existing_lora: str = ""


# the config field each Trainer widget sets (a config error about the field names the widget too)
TRAINER_WIDGET_FIELDS = {
    "preset": "model.preset", "steps": "train.steps", "learning_rate": "optim.lr", "optimizer": "optim.optimizer",
    "batch_size": "data.batch_size", "memory_budget": "memory.budget_gb", "seed": "train.seed",
    "save_every": "train.save_every", "output_name": "train.output_name", "existing_lora": "lora.init_from",
}

PRESET_HELP = (
    "Per-model defaults from the FLUX guides: rank, learning rate, LoRA targets, σ scheme and loss weighting, "
    "training guidance, DOP every N steps. auto: those of the model detected from the MODEL's weights (FLUX.1-dev, "
    "FLUX.1-schnell, FLUX.2-dev, Klein 4B, Klein 9B; an unknown size gets none); a name: that model's; none: no "
    "preset. A preset only fills settings left at their default value: any widget you changed (here, on LoRA "
    "Config, DOP Settings or a settings node) wins; to force a default value against a preset, choose none. The "
    "node's text shows what was applied.")


@dataclass(frozen=True)
class BuiltConfig:
    """``build_training_config``'s result: the config and the preset line shown on the node."""

    config: TrainingConfig
    preset_line: str


def build_training_config(dataset: DatasetSpec, lora: LoRAConfig, settings: TrainerSettings, *, output_dir: str,
                          compute_dtype: str = "float32", dop: Optional[DopSettings] = None,
                          preview: Optional[PreviewSettings] = None, init_from: str = "", extra: Any = None,
                          variant: Optional[str] = None, variant_label: str = "", model_file: str = "") -> BuiltConfig:
    """One validated ``TrainingConfig`` from the nodes' values. A config error names the
    config field (e.g. ``optim.lr``) led by the Trainer widget that sets it (``learning_rate``).
    ``init_from``: the LoRA file to continue from (the Trainer's ``existing_lora``, resolved);
    ``extra``: the settings nodes' ``SettingsValues``; ``variant``: the model variant detected
    from the MODEL (for ``preset`` auto); ``model_file``: the file the MODEL came from."""
    try:
        return _training_config(dataset, lora, settings, output_dir=output_dir, compute_dtype=compute_dtype,
                                dop=dop, preview=preview, init_from=init_from, extra=extra, variant=variant,
                                variant_label=variant_label, model_file=model_file)
    except ConfigError as e:
        names = {f: f"the Trainer's {w} widget" for w, f in TRAINER_WIDGET_FIELDS.items()}
        raise with_user_names(e, names) from None


def _training_config(dataset: DatasetSpec, lora: LoRAConfig, settings: TrainerSettings, *, output_dir: str,
                     compute_dtype: str, dop: Optional[DopSettings], preview: Optional[PreviewSettings],
                     init_from: str, extra: Any, variant: Optional[str], variant_label: str,
                     model_file: str) -> BuiltConfig:
    from trainer_core import presets

    settings_module = sibling("settings")
    NODE_DEFAULTS, apply_settings = settings_module.NODE_DEFAULTS, settings_module.apply_settings

    if not isinstance(dataset, DatasetSpec):
        raise ValueError("the Trainer's dataset input must come from a FlowTrain Dataset node")
    s = settings
    preview = preview if preview is not None else PreviewSettings()
    if init_from:
        lora = dataclasses.replace(lora, init_from=init_from)
    config = TrainingConfig(
        data=dataset.data_config(s.batch_size),
        lora=lora,
        optim=OptimConfig(optimizer=s.optimizer, lr=s.learning_rate),
        dop=dop.config if dop is not None else DopConfig(),
        preview=preview.config,
        validation=preview.validation,
        train=TrainConfig(steps=s.steps, seed=s.seed, precision=NODE_DEFAULTS["train.precision"],
                          gradient_checkpointing=NODE_DEFAULTS["train.gradient_checkpointing"],
                          save_every=s.save_every, output_dir=output_dir, output_name=s.output_name,
                          existing_run="resume"),
        memory=memory_config(s.memory_budget),
        model=ModelConfig(preset=s.preset, file=model_file),
    )
    config = apply_settings(config, extra.as_dict() if extra is not None else {})
    config, name, kept = presets.with_preset(config, variant)
    line = presets.describe(config, name, kept, label=variant_label if name == variant else name or variant_label)
    train = dataclasses.replace(config.train, precision=resolve_precision(config.train.precision, compute_dtype))
    return BuiltConfig(config.replace(train=train), line)


def unfinished_run_marker(run_dir: str | os.PathLike) -> str:
    """The Trainer's cache fingerprint: "" unless ``run_dir/training_state.json`` says the
    run ended before its last step (a ``.stop`` file, a Cancel, an error), then
    ``"unfinished:<status>:<step>/<total>"``. So ComfyUI re-runs the Trainer when the same
    graph is queued again after a stop, and it resumes; a finished run stays cached."""
    path = Path(run_dir) / "training_state.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        step, total = int(doc["step"]), int(doc["total_steps"])
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {path}: {e}"  # let the Trainer run and report it
    return "" if step >= total else f"unfinished:{doc.get('status')}:{step}/{total}"


# ----------------------------------------------------------------------------- widget order
def _settings_groups():
    return sibling("settings").GROUPS


NODE_WIDGETS: dict[str, tuple[str, ...]] = {
    "FlowTrainDataset": ("folder", "caption_extension", "strict", "control_images"),
    "FlowTrainBucketer": ("resolutions", "step", "min_side", "max_side", "allow_upscale"),
    "FlowTrainCaptions": ("trigger_word", "class_word", "keep_tokens", "separator", "shuffle", "caption_dropout"),
    "FlowTrainLoraConfig": ("rank", "alpha", "dropout", "targets", "target_regex", "dtype", "algorithm", "lokr_factor",
                            "lokr_decompose_both", "lokr_full_matrix"),
    "FlowTrainDopSettings": ("enabled", "class_word", "multiplier", "every_n_steps", "gradient_surgery"),
    "FlowTrainPreviewSettings": ("every_n_steps", "prompts", "seed", "steps", "width", "height", "guidance",
                                 "validation_every", "validation_images"),
    "FlowTrainTrainer": tuple(f.name for f in dataclasses.fields(TrainerSettings)),
    **{g.node_id: tuple(g.widgets()) for g in _settings_groups()},
    "FlowTrainSaveLora": ("name",),
    "FlowTrainSamplerPreview": ("prompts", "trigger_word", "seed", "steps", "guidance", "sampler_name", "scheduler",
                                "width", "height", "mode", "strengths"),
}
"""Widget inputs of each FlowTrain node, in schema order (= the order of a UI-format
node's ``widgets_values``). The ComfyUI tests check the schemas against this."""


class LoraTensors(dict):
    """A LORA_MODEL (name → tensor, what ComfyUI's Load LoRA Model takes) that also carries
    the safetensors metadata of the file it came from, for FlowTrain Save LoRA."""

    def __init__(self, tensors: dict, metadata: Optional[dict] = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
