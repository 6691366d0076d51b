"""The small protocols the engine trains through.

A ComfyUI node, the command-line demo and the tests all hand the engine the same three
things: a ``LatentCodec`` (pixels ↔ model-space latents), a ``TextEncoder`` (caption →
``TextEmbedding``) and a ``FlowModel`` (the transformer plus how to call it). Nothing in
here knows about ComfyUI or diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class TextEmbedding:
    """One caption's conditioning.

    ``context``: [T, D] per-token hidden states. ``pooled``: [P] or None (FLUX.2 has none).
    """

    context: torch.Tensor
    pooled: Optional[torch.Tensor] = None


@dataclass
class TextBatch:
    """Conditioning for a batch: ``context`` [B, T, D] (zero-padded on the right to the
    longest caption), ``pooled`` [B, P] or None."""

    context: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    @staticmethod
    def collate(items: list[TextEmbedding]) -> "TextBatch":
        length = max(e.context.shape[0] for e in items)
        width = items[0].context.shape[1]
        context = items[0].context.new_zeros(len(items), length, width)
        for i, e in enumerate(items):
            context[i, : e.context.shape[0]] = e.context
        pooled = None
        if items[0].pooled is not None:
            pooled = torch.stack([e.pooled for e in items])
        return TextBatch(context, pooled)

    def to(self, device, dtype=None) -> "TextBatch":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return TextBatch(move(self.context), move(self.pooled))


@dataclass
class Batch:
    """What one micro-step trains on. All samples share one bucket (same latent size).

    ``latents``: [B, C, h, w] clean model-space latents x0. ``text``: the (processed)
    caption conditioning. ``extras`` carries per-term inputs, e.g. ``"class_text"`` for
    preservation losses. ``references``: the clean model-space latents of the reference
    (control) images of an edit dataset, one [B, C, h', w'] tensor per reference slot
    (empty for ordinary data); every prediction of the step is conditioned on them.
    """

    latents: torch.Tensor
    text: TextBatch
    captions: list[str]
    sources: list[str]
    extras: dict[str, Any] = field(default_factory=dict)
    references: list[torch.Tensor] = field(default_factory=list)


@runtime_checkable
class LatentCodec(Protocol):
    """Pixels [B, 3, H, W] in [-1, 1] ↔ model-space latents x0 [B, C, H/f, W/f].

    ``encode`` returns latents already in the space the transformer is trained in
    (FLUX.1: ``(z - shift)·scale``). ``identity`` names the codec and its weights; it is
    part of every cache key, so a different VAE never reuses another's latents.
    """

    identity: str
    downscale: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Captions → one ``TextEmbedding`` each. ``identity`` is part of the cache key.

    Optional: ``overlong(texts) -> dict[str, str]`` maps each text longer than the
    encoder's token limit to what is cut off; the dataset then warns naming the caption
    files."""

    identity: str

    def encode(self, texts: list[str]) -> list[TextEmbedding]: ...


@runtime_checkable
class FlowModel(Protocol):
    """A flow-matching transformer the engine can put a LoRA on and train.

    ``module`` is the ``nn.Module`` LoRA layers are injected into. ``velocity`` takes
    unpacked latents [B, C, h, w] and σ [B] in (0, 1) and returns the raw velocity
    prediction [B, C, h, w] in float32; packing, position ids and padding are the
    adapter's business. ``references`` (edit models): clean reference latents, one
    [B, C, h', w'] per reference, conditioning the prediction the way the model does at
    inference; the output covers the target tokens only. ``supports_references``: whether
    the adapter accepts them (absent = False). ``lora_format`` names the file format (``trainer_core.lora``)
    and ``bfl_name`` maps a ``module`` submodule name to its BFL (ComfyUI) name plus the
    output-row slice it occupies inside a fused BFL weight, or None when it has no BFL
    counterpart.
    """

    arch: str  # a models.families name: "flux1" | "flux2" | ...
    module: nn.Module
    latent_channels: int
    pixel_multiple: int  # bucket sides must be multiples of this (VAE factor × patch)
    lora_format: str
    default_targets: dict[str, str]  # preset name → module-name regex

    def image_tokens(self, latent_hw: tuple[int, int]) -> int: ...

    def velocity(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        text: TextBatch,
        guidance: Optional[float] = None,
        references: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor: ...

    def bfl_name(self, module_name: str) -> Optional["BflSlot"]: ...


@dataclass(frozen=True)
class BflSlot:
    """Where a trained submodule lands in the BFL layout: module ``name`` and, for a fused
    weight (qkv, single-block linear1), the ``part`` index among the output-row slices of
    sizes ``sizes``. An unfused module has empty ``sizes``."""

    name: str
    part: int = 0
    sizes: tuple[int, ...] = ()

    @property
    def fused(self) -> bool:
        return len(self.sizes) > 1
