"""The run folder's ``README.md``: a model card, so the folder can be shared as it is.

Written once training has ended and ``lora_final.safetensors`` is saved (``session.train_lora``);
a failure to write it is logged and never touches the LoRA. It holds the base model variant
and file, the trigger and class words, how to use the file, the settings that matter, the
dataset, the steps, the validation result, the loss curve (``learning_curve.svg``) and the
final preview images (``previews/final/p<i>_trigger.png`` / ``p<i>_plain.png``) when previews ran.
All links are relative to the run folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_write_text
from .config import TrainingConfig
from .models.variants import Detection
from .previews import PREVIEW_DIR
from .report import moving_average

log = logging.getLogger(__name__)

FILENAME = "README.md"


def _row(name: str, value: Any) -> str:
    return f"| {name} | {str(value).replace('|', '/')} |"


def settings_rows(c: TrainingConfig) -> list[str]:
    """The settings that decide what a LoRA learns, as table rows."""
    rows = [
        ("LoRA rank / alpha", f"{c.lora.rank} / {c.lora.alpha:g}"),
        ("target layers", c.lora.targets if c.lora.targets != "custom" else f"custom: `{c.lora.target_regex}`"),
        ("learning rate", f"{c.optim.lr:g} ({c.optim.optimizer}, {c.optim.schedule}, warmup {c.optim.warmup_steps})"),
        ("batch size × accumulation", f"{c.data.batch_size} × {c.optim.grad_accum}"),
        ("resolutions", ", ".join(str(r) for r in c.data.buckets.resolutions)),
        ("noise levels (σ)", c.flow.sigma_scheme + (f" (shift {c.flow.shift:g})" if c.flow.sigma_scheme == "shift" else "")
         + f", weighting {c.flow.weighting}"),
        ("loss", c.loss.loss_type + (f", Min-SNR γ {c.loss.min_snr_gamma:g}" if c.loss.min_snr_gamma else "")),
        ("training guidance", f"{c.flow.guidance:g}"),
        ("precision", c.train.precision),
        ("seed", c.train.seed),
    ]
    if c.dop.enabled:
        rows.append(("output preservation (DOP)", f"×{c.dop.multiplier:g} every {c.dop.every_n_steps} step(s)"))
    if c.ema.enabled:
        rows.append(("EMA", f"decay {c.ema.decay:g}" + (" (the file holds the EMA weights)" if c.ema.use_for_output else "")))
    if c.optim.loraplus_lr_ratio:
        rows.append(("LoRA+ ratio", f"{c.optim.loraplus_lr_ratio:g}"))
    return [_row(k, v) for k, v in rows]


def preview_table(run_dir: Path, prompts: tuple[str, ...], trigger: str) -> list[str]:
    """Markdown rows of the final previews, with and without the trigger, per prompt."""
    final = run_dir / PREVIEW_DIR / "final"
    rows = []
    for i, prompt in enumerate(prompts):
        with_t, without = final / f"p{i}_trigger.png", final / f"p{i}_plain.png"
        if not (with_t.is_file() or without.is_file()):
            continue
        cell = lambda p: f"![{p.stem}]({PREVIEW_DIR}/final/{p.name})" if p.is_file() else "(missing)"  # noqa: E731
        rows.append(f"| {prompt.replace('|', '/')} | {cell(with_t)} | {cell(without)} |")
    if not rows:
        return []
    return ["## Final previews", "", f"| prompt | with `{trigger}` | without |" if trigger else
            "| prompt | with trigger | without |", "|---|---|---|", *rows, ""]


def model_card(run_dir: Path, config: TrainingConfig, *, variant: Optional[Detection], model_name: str, steps: int,
               reason: str, history: list[dict], dataset_summary: dict[str, Any]) -> str:
    c = config
    run_dir = Path(run_dir)
    label = variant.variant.label if variant is not None else "FLUX"
    trigger, class_word = c.data.captions.trigger_word, c.data.captions.class_word
    lines = [f"# {c.train.output_name}", "",
             f"A LoRA for **{label}**" + (f" (base model file `{model_name}`)" if model_name else "") +
             ", trained with FlowTrain.", ""]
    if variant is not None:
        lines += [f"Base model detected from its weights: {variant.describe()}.", ""]
    lines += ["## Use", "",
              "Load `lora_final.safetensors` with ComfyUI's *LoraLoaderModelOnly* (or any FLUX LoRA loader) on the "
              "same base model" + (f" and write **`{trigger}`** in the prompt" if trigger else "") + "." +
              (f" It was trained as a kind of *{class_word}*." if class_word else ""), ""]
    if (run_dir / "best" / "lora.safetensors").is_file():
        best = _read_json(run_dir / "best" / "best.json")
        lines += [f"`best/lora.safetensors` is the LoRA of step {best.get('step', '?')}, the lowest validation loss "
                  f"({best.get('validation_loss', float('nan')):.4f}).", ""]
    lines += ["## Training", "", "| | |", "|---|---|",
              _row("trigger word", f"`{trigger}`" if trigger else "(none)"),
              _row("class word", class_word or "(none)"),
              _row("steps", f"{steps} of {c.train.steps} ({reason})")]
    losses = [h["loss"] for h in history]
    if losses:
        lines.append(_row("final loss (moving average of 20)", f"{moving_average(losses)[-1]:.4f}"))
    lines += _dataset_rows(dataset_summary)
    lines += settings_rows(c)
    lines += ["", "The full configuration is in `config.json` and in the LoRA file's metadata "
              "(`flowtrain.config`); `flowtrain train --config config.json --comfyui-models DIR` trains it again "
              "(the model file is found by the name the run recorded; `--data` if the images moved).", ""]
    if (run_dir / "learning_curve.svg").is_file():
        lines += ["## Loss curve", "", "![learning curve](learning_curve.svg)", ""]
    lines += preview_table(run_dir, c.preview.prompts, trigger)
    if (run_dir / "tensorboard").is_dir():
        lines += ["TensorBoard logs: `tensorboard --logdir tensorboard` in this folder.", ""]
    return "\n".join(lines)


def _dataset_rows(summary: dict[str, Any]) -> list[str]:
    rows = []
    if "images" in summary:
        rows.append(_row("training images", summary["images"]))
    if summary.get("samples_per_epoch"):
        rows.append(_row("samples per epoch (with repeats)", summary["samples_per_epoch"]))
    if summary.get("buckets"):
        rows.append(_row("buckets (w×h: images)", ", ".join(f"{k}: {v}" for k, v in summary["buckets"].items())))
    if summary.get("validation_images"):
        rows.append(_row("validation images (held out)", summary["validation_images"]))
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_model_card(run_dir: Path, config: TrainingConfig, **facts: Any) -> Path:
    path = Path(run_dir) / FILENAME
    atomic_write_text(path, model_card(run_dir, config, **facts))
    return path


def write_after_training(run_dir: Path, config: TrainingConfig, lora_path: Path, **facts: Any) -> Optional[Path]:
    """The model card, once ``lora_path`` exists; a failure is logged (the LoRA is already saved)."""
    if not Path(lora_path).is_file():
        return None
    try:
        path = write_model_card(run_dir, config, **facts)
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("could not write the model card %s: %s (the LoRA itself is saved)", Path(run_dir) / FILENAME, e)
        return None
    log.info("model card: %s", path)
    return path
