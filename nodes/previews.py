"""Training previews rendered by ComfyUI's sampler on the live model.

During training the Trainer's ``model_patcher.model.diffusion_model`` carries the live LoRA
layers, so sampling that patcher shows the LoRA as trained so far. The prompts (with and
without the trigger word, and the empty negative) are encoded with the captions, through
the run's content-keyed text cache (``prompt_texts`` → ``train_lora(prompts=...)``), so a
re-queue or a resume encodes none of them again and rendering needs no CLIP: the renderer
reads them from the run's embeddings. Each is rendered with and without the trigger word
from the same seed.

Edit LoRAs (``data.control_images``): each prompt edits the held reference image the engine
picks (``trainer_core.previews.edit_reference``) with the LoRA and without it, at that image's
size: ``p{i}_edit_lora.png`` and ``p{i}_edit_base.png`` (its reference as ``reference.png``).

``preview_callback`` wires the renderer into the engine's ``trainer_core.previews.PreviewCallback``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from trainer_core.config import PreviewConfig

from . import specs
from .sampling import Conditioning, sample_image, save_png

log = logging.getLogger(__name__)

PREVIEW_EVENT = "flowtrain.preview"


@contextlib.contextmanager
def sampling_mode():
    """Inference state for sampling in the middle of training: ComfyUI's inference rope
    path (``in_training`` False) and inference mode, as in any node (the conditioning
    tensors are inference tensors, which ops outside inference mode refuse to read in
    place). Parameters are only read. The caller's state comes back after."""
    import comfy.model_management as mm

    was = mm.in_training
    mm.in_training = False
    try:
        with torch.inference_mode():
            yield
    finally:
        mm.in_training = was


Pairs = Sequence[tuple[Conditioning, Conditioning]]
# (state) -> (per prompt (with trigger, without), negative or None)
Conditionings = Callable[[object], tuple[Pairs, Optional[Conditioning]]]


def prompt_texts(settings: PreviewConfig, trigger: str) -> list[str]:
    """The texts the previews encode (``train_lora(prompts=...)``): both forms of every
    prompt and the empty negative."""
    from trainer_core.previews import prompt_texts as texts

    return texts(settings.prompts or ("",), trigger)


def cached_conditionings(settings: PreviewConfig, trigger: str) -> Conditionings:
    """Conditionings from the run's cached embeddings (a CLIP encoded them with the captions)."""
    from trainer_core.previews import run_embeddings

    from .sampling import embedding_conditioning

    def resolve(state):
        embeddings = run_embeddings(state)

        def cond(text: str) -> Conditioning:
            if text not in embeddings:
                raise KeyError(f"preview prompt {text!r} was not encoded with the captions (pass prompt_texts(...) "
                               "to train_lora)")
            return embedding_conditioning(embeddings[text])

        pairs = [tuple(cond(t) for t in specs.trigger_variants(p, trigger)) for p in settings.prompts or ("",)]
        return pairs, cond("")

    return resolve


def fixed_conditionings(settings: PreviewConfig, conditioning: Conditioning) -> Conditionings:
    """Without a CLIP the given ``conditioning`` stands for every prompt (tests,
    fixed-conditioning graphs); the negative is its zeroed copy."""
    if conditioning is None:
        raise ValueError("previews need a CLIP or a CONDITIONING to sample with")
    pairs = [(conditioning, conditioning) for _ in settings.prompts or ("",)]
    return lambda state: (pairs, None)


def comfy_renderer(model_patcher, vae, conditionings: Conditionings, settings: PreviewConfig, *,
                   sampler_name: str = "euler", scheduler: str = "simple") -> Callable:
    """A ``Renderer`` (``(state, folder) -> [png paths]``) writing ``p{i}_trigger.png`` and
    ``p{i}_plain.png`` per prompt; ``conditionings(state)`` gives the prompts' conditioning."""

    def render(state, folder: Path) -> list[Path]:
        from trainer_core.previews import edit_reference

        paths: list[Path] = []
        pairs, negative = conditionings(state)
        edit = edit_reference(state)
        if edit is not None:
            return render_edit(state, folder, pairs, negative, edit)
        with sampling_mode():
            for i, pair in enumerate(pairs):
                for kind, positive in zip(("trigger", "plain"), pair):
                    image = sample_image(model_patcher, vae, positive, negative, seed=settings.seed,
                                         steps=settings.steps, guidance=settings.guidance,
                                         sampler_name=sampler_name, scheduler=scheduler,
                                         width=settings.width, height=settings.height)
                    paths.append(Path(save_png(image, Path(folder) / f"p{i}_{kind}.png")))
        return paths

    def render_edit(state, folder: Path, pairs, negative, edit) -> list[Path]:
        latents, _source, (h, w) = edit
        ratio = vae.spacial_compression_encode()
        paths: list[Path] = []
        with sampling_mode():
            raw = [model_patcher.model.process_latent_out(r.clone()) for r in latents]
            image = vae.decode(raw[0])
            paths.append(Path(save_png(image.reshape(-1, *image.shape[-3:])[:1].float().clamp(0, 1).cpu(),
                                       Path(folder) / "reference.png")))
            for i, (positive, _plain) in enumerate(pairs):
                for kind in ("lora", "base"):
                    with state.network.disabled() if kind == "base" else contextlib.nullcontext():
                        image = sample_image(model_patcher, vae, positive, negative, seed=settings.seed,
                                             steps=settings.steps, guidance=settings.guidance,
                                             sampler_name=sampler_name, scheduler=scheduler, width=w * ratio,
                                             height=h * ratio, references=raw)
                    paths.append(Path(save_png(image, Path(folder) / f"p{i}_edit_{kind}.png")))
        return paths

    return render


def announce(node_id: Optional[str], output_dir: str) -> Callable[[list[Path]], None]:
    """``on_images`` hook: a ``flowtrain.preview`` event listing the images as ComfyUI
    ``/view`` references (they live under the output folder)."""

    def on_images(paths: list[Path]) -> None:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
        if server is None:
            return
        base = Path(output_dir).resolve()
        images = []
        for p in paths:
            p = Path(p).resolve()
            if base in p.parents:
                images.append({"filename": p.name, "subfolder": str(p.parent.relative_to(base)), "type": "output"})
        server.send_sync(PREVIEW_EVENT, {"node": node_id, "images": images}, server.client_id)

    return on_images


def preview_callback(render: Callable, settings: PreviewConfig, on_images: Optional[Callable] = None):
    """The engine callback, or None when previews are off."""
    if settings.every_n_steps < 1:
        return None
    from trainer_core.previews import PreviewCallback

    return PreviewCallback(render, settings.every_n_steps, on_images)
