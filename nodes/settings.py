"""Settings groups: the engine's rarer options as optional nodes that chain into the Trainer.

Each group (``GROUPS``) names the config fields its node sets; the node's widgets are
generated from those fields' metadata (``widget_specs``: type, default, range, choices, help
text as the tooltip), so a node and the config cannot drift apart. A settings node outputs
``SettingsValues``: the fields whose widget differs from the node default, chained with the
values of the settings node plugged into its own ``settings`` input. The Trainer lays them
over the config it builds from its own widgets (``apply_settings``).

Where every config field is set (``field_sources``): a node widget, or ``ENGINE_ONLY`` with
the reason it is not a widget. ``tests/test_settings_nodes.py`` checks that the two cover the
whole config tree.

Nothing here imports ComfyUI (the pure part; ``nodes/settings_nodes.py`` makes the nodes).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from trainer_core.config import ConfigError, TrainingConfig, field_names

# widget default where the node's differs from the engine's: ComfyUI knows the MODEL's own
# dtype and the free memory, so "auto" is the right default there (the command line keeps
# the engine's defaults, which need no model)
NODE_DEFAULTS: dict[str, Any] = {"train.precision": "auto", "train.gradient_checkpointing": "auto"}


@dataclass(frozen=True)
class Group:
    node_id: str
    title: str
    description: str
    fields: tuple[str, ...]  # dotted config fields, in widget order; "widget=dotted" renames a widget
    aliases: tuple[str, ...] = ()

    def widgets(self) -> dict[str, str]:
        """Widget name → dotted config field."""
        out = {}
        for entry in self.fields:
            name, _, dotted = entry.rpartition("=")
            out[name or dotted.rsplit(".", 1)[-1]] = dotted
        return out


GROUPS: tuple[Group, ...] = (
    Group("FlowTrainLossSettings", "FlowTrain Loss & Noise",
          "How noise levels are drawn and weighted, the loss function (Huber, Min-SNR, wavelet) and noise tricks "
          "(offset, pyramid, input perturbation). Plug into the Trainer's settings input.",
          ("flow.sigma_scheme", "flow.sigmoid_mean", "flow.sigmoid_std", "flow.shift", "flow.weighting",
           "flow.guidance", "loss.loss_type", "loss.huber_c", "loss.huber_schedule", "loss.min_snr_gamma",
           "loss.wavelet_loss", "loss.wavelet", "loss.wavelet_levels", "flow.noise_offset",
           "flow.pyramid_noise_discount", "flow.ip_noise_gamma", "loss.sigma_bins"),
          ("timestep sampling", "min snr", "huber", "noise offset", "loss weighting", "sigma")),
    Group("FlowTrainOptimizerSettings", "FlowTrain Optimizer",
          "Learning-rate schedule and warmup, gradient accumulation and clipping, optimizer details and LoRA+. "
          "Plug into the Trainer's settings input.",
          ("optim.schedule", "optim.warmup_steps", "optim.grad_accum", "optim.max_grad_norm", "optim.weight_decay",
           "optim.betas", "optim.eps", "optim.loraplus_lr_ratio", "optim.min_lr_ratio", "optim.num_cycles",
           "optim.cycle_mult", "optim.cycle_gamma", "optim.power", "optim.prodigy_d_coef",
           "optim.prodigy_safeguard_warmup"),
          ("lr schedule", "warmup", "lora+", "loraplus", "weight decay", "gradient accumulation")),
    Group("FlowTrainEmaSettings", "FlowTrain EMA",
          "An exponential moving average of the LoRA weights (smoother results). Plug into the Trainer's settings "
          "input.",
          ("ema.enabled", "ema.decay", "ema.power", "ema.inv_gamma", "ema.update_every", "ema.on_cpu",
           "ema.use_for_output"),
          ("exponential moving average",)),
    Group("FlowTrainAugmentSettings", "FlowTrain Augmentation & Captions",
          "Image augmentation (flip, random crop, colour jitter) and caption extras (wildcards, tag dropout, "
          "caption-dropout warmup). Plug into the Trainer's settings input.",
          ("data.augment.flip", "data.augment.flip_opt_out_words", "data.augment.random_crop",
           "data.augment.color_jitter", "data.augment.brightness", "data.augment.contrast", "data.augment.saturation",
           "data.captions.wildcards", "data.captions.tag_dropout", "data.captions.shuffle_variants",
           "data.captions.caption_dropout_warmup_steps"),
          ("flip", "augmentation", "wildcards", "tag dropout", "color jitter")),
    Group("FlowTrainMemorySettings", "FlowTrain Memory & Precision",
          "Compute precision, gradient checkpointing, torch.compile and weight streaming. Plug into the Trainer's "
          "settings input (the Trainer's memory_budget sets the budget).",
          ("train.precision", "train.gradient_checkpointing", "train.compile", "memory.streaming", "memory.margin_gb",
           "data.cache_dir"),
          ("vram", "offload", "gradient checkpointing", "precision", "bf16")),
    Group("FlowTrainRunSettings", "FlowTrain Run & Tracking",
          "Logging, TensorBoard, checkpoints kept, resuming from a chosen checkpoint, and the validation loss's "
          "folder, noise levels and seed. Plug into the Trainer's settings input.",
          ("train.log_every", "train.tensorboard", "train.keep_checkpoints", "train.resume_from",
           "validation_path=validation.path", "validation_sigmas=validation.sigmas", "validation_seed=validation.seed",
           "validation.keep_best"),
          ("tensorboard", "checkpoints", "validation", "logging")),
)

# every config field that no widget sets, with the reason
ENGINE_ONLY: dict[str, str] = {
    "train.output_dir": "the nodes write every run to <ComfyUI output>/flowtrain (the run name is the Trainer's "
                        "output_name)",
    "train.existing_run": "a Trainer always resumes its run folder (re-queueing continues a stopped run); "
                          "'refuse' is a command-line safety",
    "train.base_quantization": "command line only: it quantizes a diffusers folder while loading; a ComfyUI MODEL "
                               "arrives loaded, with its own quantization (fp8, comfy_quant files)",
    "model.file": "recorded from the MODEL (the file UNETLoader loaded), not chosen",
    "model.variant": "recorded from the MODEL's weights (models/variants.py), not chosen",
}

# the other nodes' widgets → config fields (the Trainer's are in specs.TRAINER_WIDGET_FIELDS)
NODE_FIELDS: dict[str, dict[str, str]] = {
    "FlowTrainDataset": {"folder": "data.path", "caption_extension": "data.captions.caption_extension",
                         "strict": "data.strict", "control_images": "data.control_images"},
    "FlowTrainBucketer": {n: f"data.buckets.{n}" for n in ("resolutions", "step", "min_side", "max_side",
                                                           "allow_upscale")},
    "FlowTrainCaptions": {n: f"data.captions.{n}" for n in ("trigger_word", "class_word", "keep_tokens", "separator",
                                                            "shuffle", "caption_dropout")},
    "FlowTrainLoraConfig": {n: f"lora.{n}" for n in ("rank", "alpha", "dropout", "targets", "target_regex", "dtype",
                                                     "algorithm", "lokr_factor", "lokr_decompose_both",
                                                     "lokr_full_matrix")},
    "FlowTrainDopSettings": {n: f"dop.{n}" for n in ("enabled", "class_word", "multiplier", "every_n_steps",
                                                     "gradient_surgery")},
    "FlowTrainPreviewSettings": {**{n: f"preview.{n}" for n in ("every_n_steps", "prompts", "seed", "steps", "width",
                                                                "height", "guidance")},
                                 "validation_every": "validation.every_n_steps", "validation_images": "validation.images"},
    **{g.node_id: g.widgets() for g in GROUPS},
}


def field_sources(trainer_fields: dict[str, str]) -> dict[str, list[str]]:
    """Dotted config field → ["Node.widget", ...] that set it (``trainer_fields``: the Trainer's
    widget → field map)."""
    out: dict[str, list[str]] = {}
    for node, widgets in {**NODE_FIELDS, "FlowTrainTrainer": trainer_fields}.items():
        for widget, dotted in widgets.items():
            out.setdefault(dotted, []).append(f"{node}.{widget}")
    return out


# ----------------------------------------------------------------------------- field metadata
def config_field(dotted: str) -> dataclasses.Field:
    """The dataclass field of a dotted config name."""
    cls: type = TrainingConfig
    *sections, leaf = dotted.split(".")
    for section in sections:
        f = next(f for f in dataclasses.fields(cls) if f.name == section)
        cls = type(f.default_factory())  # type: ignore[misc]
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


def node_default(dotted: str) -> Any:
    return NODE_DEFAULTS.get(dotted, config_field(dotted).default)


def _step(default: float, hi: Optional[float]) -> float:
    if default:
        return min(0.1, 10.0 ** (math.floor(math.log10(abs(default))) - 1))
    return 0.01 if hi is not None and hi <= 1 else 0.1


@dataclass(frozen=True)
class WidgetSpec:
    """One widget of a settings node, from its config field: ``kind`` is BOOLEAN, INT, FLOAT,
    COMBO or STRING (a tuple field is a comma-separated STRING)."""

    name: str
    field: str
    kind: str
    default: Any
    tooltip: str
    options: tuple = ()
    bounds: tuple = ()  # ((key, value), ...): min, max, step


def widget_spec(name: str, dotted: str) -> WidgetSpec:
    f = config_field(dotted)
    meta, kind_name = f.metadata, str(f.type)
    default = node_default(dotted)
    tooltip = f"{meta['help']} [{dotted}]"
    if meta.get("choices") is not None:
        return WidgetSpec(name, dotted, "COMBO", default, tooltip, tuple(meta["choices"]()))
    if kind_name.startswith("tuple"):
        return WidgetSpec(name, dotted, "STRING", ", ".join(str(v) for v in default), tooltip + " Comma-separated.")
    bounds = [(k, meta[key]) for k, key in (("min", "lo"), ("max", "hi")) if meta.get(key) is not None]
    if kind_name == "bool":
        return WidgetSpec(name, dotted, "BOOLEAN", default, tooltip)
    if kind_name == "int":
        return WidgetSpec(name, dotted, "INT", default, tooltip, bounds=tuple(bounds))
    if kind_name == "float":
        step = _step(default, meta.get("hi"))
        return WidgetSpec(name, dotted, "FLOAT", default, tooltip, bounds=(*bounds, ("step", step), ("round", step / 10)))
    return WidgetSpec(name, dotted, "STRING", default, tooltip)


def widget_specs(group: Group) -> list[WidgetSpec]:
    return [widget_spec(name, dotted) for name, dotted in group.widgets().items()]


def _parse_tuple(text: str, dotted: str, item_type: str) -> tuple:
    parts = [p.strip() for p in re.split(r"[,\n]+", str(text)) if p.strip()]
    if item_type == "str":
        return tuple(parts)
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{dotted}={text!r} must be numbers separated by commas, e.g. '0.9, 0.999'") from None


def widget_value(dotted: str, value: Any) -> Any:
    """A widget's value as the config field's type (comma-separated text → tuple)."""
    kind = str(config_field(dotted).type)
    match = re.match(r"tuple\[(\w+)", kind)
    if match:
        return _parse_tuple(value, dotted, match.group(1))
    return value


# ----------------------------------------------------------------------------- values
@dataclass(frozen=True)
class SettingsValues:
    """What settings nodes set: ``(dotted field, value), ...`` in chain order (a later node of
    the chain wins a field two nodes set) and the node titles, for messages."""

    values: tuple[tuple[str, Any], ...] = ()
    sources: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


def settings_values(group: Group, widgets: dict[str, Any], previous: Optional[SettingsValues] = None) -> SettingsValues:
    """A settings node's widgets → ``SettingsValues`` chained after ``previous``: only the
    widgets that differ from their default (so a settings node left alone changes nothing, and
    a model preset still fills those fields). Each value is checked against its config field
    here, so the node that has the bad value is the one that fails."""
    known = group.widgets()
    unknown = set(widgets) - set(known)
    if unknown:
        raise ValueError(f"{group.title}: unknown widget(s) {sorted(unknown)}")
    chosen = {}
    for name, dotted in known.items():
        if name not in widgets:
            continue
        value = widget_value(dotted, widgets[name])
        if not _same(value, node_default(dotted), widget_spec(name, dotted)):
            chosen[dotted] = value
    _check(chosen, group.title)
    before = previous or SettingsValues()
    merged = {**before.as_dict(), **chosen}
    return SettingsValues(tuple(merged.items()), (*before.sources, group.title))


def _same(value: Any, default: Any, spec: WidgetSpec) -> bool:
    """A widget still at its default; a FLOAT within the widget's rounding of it counts (the
    frontend rounds 2/3 to 0.667)."""
    if spec.kind == "FLOAT" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return abs(value - default) <= dict(spec.bounds).get("round", 0.0) + 1e-12
    return value == default


def _check(values: dict[str, Any], who: str) -> None:
    try:
        apply_settings(TrainingConfig(), values)
    except ConfigError as e:
        raise ConfigError(f"{who}: {e}") from None


def apply_settings(config: TrainingConfig, values: dict[str, Any]) -> TrainingConfig:
    """``config`` with the dotted ``values`` set (validated as a whole)."""
    if not values:
        return config
    tree = config.to_dict()
    known = set(field_names(TrainingConfig))
    for dotted, value in values.items():
        if dotted not in known:
            raise ConfigError(f"unknown config field {dotted!r}")
        node = tree
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return TrainingConfig.from_dict(tree)
