"""Sampling with ComfyUI's own machinery (``comfy.sample`` = what KSampler runs), shared
by the Sampler preview node and the Trainer's in-training previews.

Guidance: a model with a guidance embedding (FLUX.1-dev, FLUX.2-dev) gets the value in
its conditioning (what FluxGuidance does) and samples at cfg 1; others (schnell, Klein)
use it as the CFG scale against the negative conditioning.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

Conditioning = list  # ComfyUI: [[context [1, T, D], {"pooled_output": ..., "guidance": ...}], ...]


def encode_prompt(clip, text: str) -> Conditioning:
    """``text`` through ComfyUI's CLIP object, as CLIPTextEncode does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def embedding_conditioning(emb) -> Conditioning:
    """A cached ``TextEmbedding`` (context [T, D], pooled [P] or None) as the CONDITIONING
    CLIPTextEncode gives for FLUX (the context and the pooled vector are all FLUX samples
    with; FLUX.2 has no pooled vector)."""
    extra = {} if emb.pooled is None else {"pooled_output": emb.pooled[None]}
    return [[emb.context[None], extra]]


def zero_conditioning(conditioning: Conditioning) -> Conditioning:
    """The same shapes, all zeros (what ConditioningZeroOut gives): a neutral negative."""
    out = []
    for context, extra in conditioning:
        extra = dict(extra)
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(context), extra])
    return out


def with_guidance(conditioning: Conditioning, guidance: float) -> Conditioning:
    """Copy of ``conditioning`` carrying a distilled-guidance value (FluxGuidance)."""
    return [[context, {**extra, "guidance": guidance}] for context, extra in conditioning]


def with_references(conditioning: Conditioning, references) -> Conditioning:
    """Copy of ``conditioning`` carrying raw VAE ``references`` latents ([1, C, h, w] each),
    as a chain of ReferenceLatent nodes sets them (edit models: FLUX.1 Kontext, FLUX.2)."""
    if not references:
        return conditioning
    return [[context, {**extra, "reference_latents": list(extra.get("reference_latents", [])) + list(references)}]
            for context, extra in conditioning]


def has_guidance_embed(model_patcher) -> bool:
    config = getattr(model_patcher.model, "model_config", None)
    return bool(getattr(config, "unet_config", {}).get("guidance_embed", False))


def guidance_and_cfg(model_patcher, positive: Conditioning, guidance: float) -> tuple[Conditioning, float]:
    """(positive to sample with, cfg scale) for ``guidance`` on this model."""
    if has_guidance_embed(model_patcher):
        return with_guidance(positive, guidance), 1.0
    return positive, guidance


def sample_image(model_patcher, vae, positive: Conditioning, negative: Optional[Conditioning], *, seed: int,
                 steps: int, guidance: float, sampler_name: str, scheduler: str, width: int,
                 height: int, references=None) -> torch.Tensor:
    """One image [1, H, W, 3] in [0, 1] from empty latents, ComfyUI's sampler and ``vae``;
    ``references``: raw VAE latents of reference images (edit models), given to the positive and
    the negative (``with_references``)."""
    import comfy.sample

    positive, cfg = guidance_and_cfg(model_patcher, positive, guidance)
    negative = negative if negative is not None else zero_conditioning(positive)
    positive, negative = with_references(positive, references), with_references(negative, references)
    ratio = vae.spacial_compression_encode()
    latent = torch.zeros([1, vae.latent_channels, height // ratio, width // ratio])
    latent = comfy.sample.fix_empty_latent_channels(model_patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent, denoise=1.0, disable_pbar=True, seed=seed)
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])[:1].float().clamp(0, 1).cpu()


def image_grid(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """[1, R·H, C·W, 3] from rows of [1, H, W, 3] images (all the same size)."""
    return torch.cat([torch.cat(row, dim=2) for row in rows], dim=1)


def save_png(image: torch.Tensor, path) -> Any:
    """[1, H, W, 3] in [0, 1] → RGB PNG at ``path``."""
    import numpy as np
    from PIL import Image

    arr = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(path)
    return path
