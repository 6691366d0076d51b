"""Differential Output Preservation (DOP): train the trigger, keep the class.

On a DOP step, on the same noisy latents ``x_t``, σ and ε as the main flow-matching term:

1. prior: LoRA disabled, no grad, caption with the trigger replaced by the class word
   → ``v_prior = v_base(x_t, σ, class caption)``;
2. main: LoRA on, trigger caption: the usual ``FlowMatchingLoss`` (its own term);
3. preservation: LoRA on, class caption: ``multiplier · MSE(v_lora(x_t, σ, class caption), v_prior)``.

The loop sums main + preservation and does one backward, so the LoRA learns the concept
under the trigger while its output on the class word is pulled back to the base model's
(ai-toolkit's "diff_output_preservation"). On other steps the term returns None.

The class captions are cached with the others: ``extra_captions`` hands the dataset the
whole-word trigger→class transform under ``CLASS_TEXT``; a dropped caption maps to the
transform of the bare trigger, i.e. the class word alone (see ``CachedDataset``).

``pcgrad_backward`` is the optional gradient surgery (PCGrad, Yu et al. 2020, "Gradient
Surgery for Multi-Task Learning", Algorithm 1) between the terms' gradients.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import CaptionConfig, DataConfig, TrainingConfig
from .data.captions import CaptionPolicy, word_pattern
from .data.scan import listing
from .loop import StepContext, sum_backward

log = logging.getLogger(__name__)

CLASS_TEXT = "class_text"  # Batch.extras key of the class-word captions


def class_word(config: TrainingConfig) -> str:
    """``dop.class_word``, else ``data.captions.class_word``."""
    return config.dop.class_word or config.data.captions.class_word


def class_caption_fn(captions: CaptionConfig, word: str) -> Callable[[str], str]:
    """caption → caption with every whole-word trigger replaced by ``word``
    (``"sks, a dog"`` → ``"man, a dog"``; ``"sksx"`` is left alone)."""
    return partial(CaptionPolicy(captions).replace_trigger, replacement=word)


def captions_without_trigger(data: DataConfig) -> list[str]:
    """Caption files under ``data.path`` that exist, are not blank and do not contain the
    trigger as a whole word. ``CaptionPolicy`` prepends the trigger to those, so their
    preservation caption is the class word prepended to the original text. [] when the
    folder is not there (``prepare_dataset`` reports that)."""
    from .data.formats import image_extensions
    from .data.scan import read_caption, repeats_for, walk_files

    root = Path(data.path).expanduser()
    trigger = data.captions.trigger_word
    if not data.path or not trigger or not root.is_dir():
        return []
    ext = data.captions.caption_extension
    ext = ext if ext.startswith(".") else "." + ext
    pattern = word_pattern(trigger)
    out = []
    files = walk_files(root)  # only what the dataset scan reads: never outside the folder
    present, allowed = set(files), set(image_extensions())
    for image in (f for f in files if f.suffix.lower() in allowed):
        file = image.with_suffix(ext)
        if file in present and repeats_for(image, root) and (text := read_caption(file, [])) and not pattern.search(text):
            out.append(str(file))
    return out


def warn_captions_without_trigger(data: DataConfig) -> list[str]:
    """Log once which caption files lack the trigger word; returns them."""
    files = captions_without_trigger(data)
    if files:
        log.warning(
            "DOP: %d caption file(s) do not contain the trigger word %r; it is prepended to them, so their "
            "preservation caption is the class word plus the original text. Put the trigger where it belongs "
            "in these captions:%s", len(files), data.captions.trigger_word, listing(files))
    return files


class DifferentialOutputPreservation:
    """Loss term ``"dop"``: ``multiplier · mean((v_lora(class) - v_base(class))²)`` on DOP steps.

    DOP steps are the 1-based optimizer steps k, 2k, 3k, ... for ``every_n_steps = k``
    (``ctx.step`` is 0-based, so ``(ctx.step + 1) % k == 0``), every micro-batch of them.
    """

    name = "dop"

    def __init__(self, multiplier: float = 1.0, every_n_steps: int = 1, key: str = CLASS_TEXT):
        if every_n_steps < 1:
            raise ValueError(f"dop.every_n_steps={every_n_steps} must be >= 1")
        self.multiplier, self.every_n_steps, self.key = float(multiplier), int(every_n_steps), key

    def active(self, step: int) -> bool:
        return (step + 1) % self.every_n_steps == 0

    def __call__(self, ctx: StepContext) -> torch.Tensor | None:
        if not self.active(ctx.step):
            return None
        text = ctx.batch.extras.get(self.key)
        if text is None:
            raise ValueError(
                f"DOP needs the class-word captions in batch.extras[{self.key!r}]; build the dataset with "
                "prepare_dataset(extra_captions=assemble.extra_captions(config)) (train_lora does)")
        with torch.no_grad(), ctx.network.disabled():
            prior = ctx.predict(text).float()
        pred = ctx.predict(text).float()
        return self.multiplier * F.mse_loss(pred, prior)


# --------------------------------------------------------------------------- gradient surgery
def pcgrad_combine(grads: list[torch.Tensor]) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Alg. 1) of flat gradients ``[N]`` each: every ``g_i`` is
    projected onto the normal plane of each other *original* ``g_j`` it conflicts with
    (``g_i·g_j < 0``: ``g_i ← g_i - (g_i·g_j / |g_j|²) g_j``), then all are summed.
    The order is fixed (the paper shuffles; with two terms the order does not matter)."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j, h in enumerate(grads):
            if i == j:
                continue
            dot = torch.dot(g, h)
            if dot < 0:
                g = g - dot / torch.dot(h, h).clamp_min(1e-30) * h
        out.append(g)
    return torch.stack(out).sum(0)


def pcgrad_backward(values: dict[str, torch.Tensor], params: list[torch.Tensor], scale: float) -> None:
    """``loop.Backward`` with PCGrad: per-term gradients over ``params`` (``autograd.grad``),
    combined by ``pcgrad_combine`` and added to ``.grad`` (accumulates across micro-steps).
    A micro-step with one term (a non-DOP step) is a plain backward."""
    if len(values) < 2:
        sum_backward(values, params, scale)
        return
    params = [p for p in params if p.requires_grad]
    flat = []
    names = list(values)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(values[name] * scale, params, retain_graph=i < len(names) - 1, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    combined = pcgrad_combine(flat)
    offset = 0
    for p in params:
        g = combined[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = g.clone() if p.grad is None else p.grad + g
