"""FLUX.1 (dev / schnell) through diffusers' ``FluxTransformer2DModel``.

The adapter turns the engine's unpacked latents [B, 16, h, w] into what the diffusers
transformer takes and back:

* 2×2 latent patches become tokens of 64 channels, in the order of
  ``FluxPipeline._pack_latents`` (diffusers ``pipelines/flux/pipeline_flux.py``):
  ``[B, C, h, w] → [B, (h/2)(w/2), C·4]`` with channel index ``c·4 + dy·2 + dx``.
* image position ids ``(0, row, col)`` per token, row-major (``_prepare_latent_image_ids``);
  text ids are all zeros ``[T, 3]``.
* the timestep is σ ∈ (0, 1); the transformer multiplies timestep and guidance by 1000.
* the guidance vector is passed only to guidance-distilled models (``guidance_embeds``,
  FLUX.1-dev); schnell has no guidance input.
* reference latents (FLUX.1 Kontext edits) are packed the same way and appended after the
  target tokens with ids ``(index, row + h_offset, col + w_offset)`` from
  ``references.reference_placements`` (ComfyUI's "offset" method by default: index 1, as
  diffusers' ``FluxKontextPipeline``); the output is cut back to the target tokens.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..lora.bfl_names import diffusers_flux1_to_bfl, flux_target_presets
from ..types import BflSlot, TextBatch
from .common import module_device, module_dtype
from .references import check_method, check_references, reference_placements

log = logging.getLogger(__name__)

PATCH = 2  # FLUX.1 packs 2×2 latent patches into one token
VAE_FACTOR = 8  # the FLUX.1 VAE downsamples by 8


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] → [B, (h/2)·(w/2), 4C]`` exactly as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    if h % PATCH or w % PATCH:
        raise ValueError(
            f"FLUX.1 latents need even height and width to pack 2×2 patches, got {h}×{w}; "
            f"use image sides that are multiples of {VAE_FACTOR * PATCH} pixels"
        )
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: ``[B, (h/2)·(w/2), 4C] → [B, C, h, w]``
    (``FluxPipeline._unpack_latents`` with the latent size given directly)."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not tile a {h}×{w} latent in 2×2 patches")
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, *, device=None, dtype=torch.float32, index: float = 0.0,
              h_offset: int = 0, w_offset: int = 0) -> torch.Tensor:
    """Position ids ``[(h/2)·(w/2), 3]`` of the packed tokens: ``(index, row, col)``,
    row-major; offsets in latent pixels (rounded to tokens like ComfyUI's ``process_img``)."""
    rows = torch.arange(h // 2, device=device, dtype=dtype) + (h_offset + 1) // 2
    cols = torch.arange(w // 2, device=device, dtype=dtype) + (w_offset + 1) // 2
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class DiffusersFlux1:
    """``FlowModel`` for a diffusers ``FluxTransformer2DModel`` (FLUX.1-dev or -schnell).

    ``dtype``: the compute dtype inputs are cast to; default the module's parameter dtype
    (set it when the stored weights are in a dtype that is not a compute dtype).
    ``gradient_checkpointing``: recompute each block in the backward pass. diffusers
    checkpoints with ``use_reentrant=False``, so frozen inputs and peft-injected LoRA
    layers still receive gradients.
    """

    arch = "flux1"
    lora_format = "flux1_kohya"

    def __init__(
        self,
        module: nn.Module,
        *,
        gradient_checkpointing: bool = False,
        dtype: Optional[torch.dtype] = None,
        reference_method: str = "offset",
    ):
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "in_channels") or not hasattr(config, "guidance_embeds"):
            raise ValueError(
                f"DiffusersFlux1 needs a diffusers FluxTransformer2DModel, got {type(module).__name__}"
            )
        if config.in_channels % (PATCH * PATCH):
            raise ValueError(
                f"transformer in_channels={config.in_channels} is not 4 × latent channels; "
                "this is not a FLUX.1 layout"
            )
        self.module = module
        self.latent_channels = config.in_channels // (PATCH * PATCH)
        self.pixel_multiple = VAE_FACTOR * PATCH
        self.has_guidance = bool(config.guidance_embeds)
        self.inner_dim = config.num_attention_heads * config.attention_head_dim
        # FLUX.1 blocks use mlp_ratio 4; read the width from the module when it says so
        singles = getattr(module, "single_transformer_blocks", None)
        first = singles[0] if singles else None
        self.mlp_hidden_dim = int(getattr(first, "mlp_hidden_dim", 4 * self.inner_dim))
        self.dtype = dtype
        self.reference_method = check_method(reference_method)
        self.supports_references = True
        self.default_targets: dict[str, str] = dict(flux_target_presets())
        if gradient_checkpointing:
            module.enable_gradient_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype or module_dtype(self.module)

    def image_tokens(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        return (h // PATCH) * (w // PATCH)

    def velocity(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        text: TextBatch,
        guidance: Optional[float] = None,
        references: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Velocity ``[B, 16, h, w]`` float32 for ``x_t`` [B, 16, h, w] at σ [B] in (0, 1).

        ``text.context`` [B, T, D_t5] and ``text.pooled`` [B, D_clip] (required).
        ``guidance`` is the distilled guidance value (dev only; ignored for schnell;
        1.0 when a dev model is given None). ``references``: clean reference latents
        [B, 16, h', w'] (Kontext-style edits).
        """
        b, c, h, w = x_t.shape
        if c != self.latent_channels:
            raise ValueError(f"FLUX.1 expects {self.latent_channels}-channel latents, got {c}")
        if text.pooled is None:
            raise ValueError("FLUX.1 needs a pooled (CLIP) text embedding; TextBatch.pooled is None")
        if text.context.shape[0] != b or text.pooled.shape[0] != b or sigma.shape != (b,):
            raise ValueError(
                f"batch sizes disagree: latents {b}, context {text.context.shape[0]}, "
                f"pooled {text.pooled.shape[0]}, sigma {tuple(sigma.shape)}"
            )
        refs = check_references(references, b, c, PATCH)
        dtype = self.compute_dtype
        device = module_device(self.module)
        hidden = pack_latents(x_t.to(device=device, dtype=dtype))
        ids = image_ids(h, w, device=device, dtype=dtype)
        targets = hidden.shape[1]
        places = reference_placements((h, w), [tuple(r.shape[2:]) for r in refs], self.reference_method, patch=PATCH)
        for r, (index, h_off, w_off) in zip(refs, places):
            hidden = torch.cat([hidden, pack_latents(r.to(device=device, dtype=dtype))], dim=1)
            ids = torch.cat([ids, image_ids(*r.shape[2:], device=device, dtype=dtype, index=index,
                                            h_offset=h_off, w_offset=w_off)])
        context = text.context.to(device=device, dtype=dtype)
        g = None
        if self.has_guidance:
            value = 1.0 if guidance is None else float(guidance)
            g = torch.full((b,), value, device=device, dtype=dtype)
        out = self.module(
            hidden_states=hidden,
            encoder_hidden_states=context,
            pooled_projections=text.pooled.to(device=device, dtype=dtype),
            timestep=sigma.to(device=device, dtype=dtype),
            img_ids=ids,
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :targets], h, w).float()

    def bfl_name(self, module_name: str) -> Optional[BflSlot]:
        """BFL (ComfyUI) name and fused-weight slice of a diffusers submodule name."""
        return diffusers_flux1_to_bfl(module_name, self.inner_dim, self.mlp_hidden_dim)
