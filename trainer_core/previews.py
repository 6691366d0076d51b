"""Preview images during training: a callback that decides *when* and *where*, and a
renderer (host-specific) that decides *how*.

``Renderer = (state, folder) -> [png paths]``. ``PreviewCallback`` calls it

* before the first step into ``<run>/previews/baseline/`` (the base model: the LoRA is still zero),
* after every ``every_n_steps``-th step into ``<run>/previews/step_{step:06d}/``, and after a
  save request (``.checkpoint``, the node's Save now: ``on_save_now``) into the same folder name,
* at the end into ``<run>/previews/final/`` (also after a stop, not after an error or an
  interrupt), after the LoRA, the checkpoint and the run's status are saved: a failure or a
  Cancel while rendering cannot lose the run,

in eval mode, under ``no_grad``, with the EMA weights when the run outputs them
(``validation.output_weights``). ``on_images`` receives the paths after each render so
a host (ComfyUI) can show them while training runs.

Previews live apart from the checkpoints (``PREVIEW_DIR``): neither the cleanup of
incomplete checkpoints on resume nor the pruning of old ones (``train.keep_checkpoints``)
touches them, and a resumed run adds its previews next to the earlier ones.

Edit LoRAs (``data.control_images``): the previews edit one *held* reference image
(``edit_reference``: the first held-out validation image's references, else the first
training image's) with the LoRA and without it (``network.disabled()``), from the same
noise, at that image's bucket size: ``p{i}_edit_lora.png`` and ``p{i}_edit_base.png``, with the
reference itself in ``reference.png``.

``demo_renderer`` is the engine-only renderer (demo, tests, command line). Prompt
embeddings: a host passes ``prompt_texts(...)`` to ``train_lora(prompts=...)``; they are
encoded with the captions through the content-keyed text cache, so a resume or a re-run
encodes none of them again, and renderers read them from ``run_embeddings(state)``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.cache import EmbeddingLookup
from .data.captions import ensure_trigger, join_tags, split_tags, word_pattern
from .loop import Callback, RunState
from .phases import during
from .validation import output_weights

log = logging.getLogger(__name__)

Renderer = Callable[[RunState, Path], list[Path]]
PREVIEW_DIR = "previews"
ImagesFn = Callable[[list[Path]], None]


class PreviewCallback(Callback):
    """Renders previews at the start, every ``every_n_steps`` steps and at the end."""

    def __init__(self, render: Renderer, every_n_steps: int, on_images: ImagesFn | None = None):
        if every_n_steps < 1:
            raise ValueError(f"PreviewCallback needs every_n_steps >= 1, got {every_n_steps} "
                             "(preview.every_n_steps=0 means off: do not add the callback)")
        self.render, self.every, self.on_images = render, every_n_steps, on_images
        self.rendered: dict[str, list[Path]] = {}  # folder name -> images

    def on_train_start(self, state: RunState) -> None:
        if state.step == 0:
            self._render(state, "baseline")

    def on_step_end(self, state: RunState, logs: dict) -> None:
        if state.step % self.every == 0 and state.step < state.total_steps:
            self._render(state, f"step_{state.step:06d}")

    def on_save_now(self, state: RunState) -> None:
        """A save request (``.checkpoint``, the node's Save now): this step's previews, unless
        the periodic ones just rendered them."""
        name = f"step_{state.step:06d}"
        if name not in self.rendered:
            self._render(state, name)

    def on_train_end(self, state: RunState, reason: str) -> None:
        if state.step > 0 and not reason.startswith("error") and not state.interrupted:
            self._render(state, "final")

    def _render(self, state: RunState, name: str) -> list[Path]:
        folder = Path(state.extra["run_dir"]) / PREVIEW_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        with during(state, "previews"), output_weights(state) as weights:
            paths = list(self.render(state, folder))
        log.info("step %d: %d preview(s) in %s (%s weights)", state.step, len(paths), folder, weights)
        self.rendered[name] = paths
        if self.on_images is not None:
            self.on_images(paths)
        return paths


def without_trigger(prompt: str, trigger: str, separator: str = ",") -> str:
    """``prompt`` with the whole-word trigger removed, and separators tidied
    (``"sks, a red ring"`` → ``"a red ring"``; ``"a photo of sks dog"`` → ``"a photo of dog"``)."""
    if not trigger:
        return prompt.strip()
    removed = word_pattern(trigger).sub("", prompt)
    tags = [" ".join(t.split()) for t in split_tags(removed, separator)]
    return join_tags([t for t in tags if t], separator)


def prompt_pairs(prompts: Sequence[str], trigger: str) -> list[tuple[str, str]]:
    """(with the trigger, without it) per preview prompt: the trigger is prepended when
    missing and removed as a whole word for the second form."""
    return [(ensure_trigger(p.strip(), trigger, ","), without_trigger(p, trigger)) for p in prompts]


def prompt_texts(prompts: Sequence[str], trigger: str, *, negative: bool = True) -> list[str]:
    """Every text the previews of ``prompts`` encode (both forms, and the empty negative):
    what a host passes as ``train_lora(prompts=...)`` so they are cached with the captions."""
    texts = [t for pair in prompt_pairs(prompts, trigger) for t in pair] + ([""] if negative else [])
    return list(dict.fromkeys(texts))


def run_embeddings(state: RunState) -> dict:
    """The run's cached text embeddings (captions and prompts), or {} without a dataset."""
    return getattr(state.data, "embeddings", None) or {}


def edit_reference(state: RunState) -> tuple[list[torch.Tensor], str, tuple[int, int]] | None:
    """``(reference latents [1, C, h, w] each, its target's file, latent (h, w))`` that edit
    previews use, or None for ordinary data (see the module docstring)."""
    for data in (state.extra.get("validation_data"), state.data):
        for entry in getattr(data, "entries", None) or ():
            if entry.references:
                return [r[None].float() for r in entry.references], str(entry.source), tuple(entry.latent.shape[-2:])
    return None


def save_png(image: torch.Tensor, path: Path) -> Path:
    """``[3, H, W]`` in [-1, 1] → an RGB PNG."""
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy()), "RGB").save(path)
    return path


def demo_renderer(codec, text_encoder, prompts: Sequence[str], trigger: str, seed: int, steps: int,
                  size: tuple[int, int] | int) -> Renderer:
    """A ``Renderer`` that Euler-samples (``demo.grid.sample_images``) every prompt with and
    without the trigger word from the same noise and writes ``p{i}_trigger.png`` and
    ``p{i}_plain.png``. ``size`` is (height, width) or one side in pixels; guidance comes
    from ``state.config.preview.guidance``."""
    from .demo.grid import sample_images

    if not prompts:
        raise ValueError("demo_renderer needs at least one prompt (preview.prompts)")
    size = (size, size) if isinstance(size, int) else tuple(size)
    pairs = prompt_pairs(prompts, trigger)

    def render(state: RunState, folder: Path) -> list[Path]:
        texts = EmbeddingLookup(run_embeddings(state), fallback=text_encoder)  # cached when passed as prompts
        edit = edit_reference(state)
        if edit is not None:
            return render_edit(state, folder, edit, texts)
        paths = []
        for i, pair in enumerate(pairs):
            for kind, prompt in zip(("trigger", "plain"), pair):  # one call each: the same noise
                image = sample_images(state.model, codec, texts, [prompt], seed=seed, steps=steps,
                                      size=size, guidance=state.config.preview.guidance)[0]
                paths.append(save_png(image, Path(folder) / f"p{i}_{kind}.png"))
        return paths

    def render_edit(state: RunState, folder: Path, edit, texts) -> list[Path]:
        refs, _source, (h, w) = edit
        edit_size = (h * codec.downscale, w * codec.downscale)
        paths = [save_png(codec.decode(refs[0])[0], Path(folder) / "reference.png")]
        for i, (prompt, _plain) in enumerate(pairs):
            for kind in ("lora", "base"):
                with (state.network.disabled() if kind == "base" else contextlib.nullcontext()):
                    image = sample_images(state.model, codec, texts, [prompt], seed=seed, steps=steps, size=edit_size,
                                          guidance=state.config.preview.guidance, references=refs)[0]
                paths.append(save_png(image, Path(folder) / f"p{i}_edit_{kind}.png"))
        return paths

    return render
