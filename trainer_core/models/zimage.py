"""Z-Image through a module with ComfyUI's NextDiT call signature (no ComfyUI import).

``module(x [B, 16, h, w], timesteps [B], context [B, T, 2560], num_tokens,
attention_mask=None, transformer_options=...)`` is ``comfy.ldm.lumina.model.NextDiT.forward``
(ComfyUI's Lumina2-architecture model, configured as Z-Image when ``dim`` is 3840). The
adapter feeds it what ComfyUI's sampler does (``comfy/model_base.py`` ``BaseModel._apply_model``
and ``Lumina2.extra_conds``):

* ``timesteps = model_sampling.timestep(σ) = σ`` in float32 (``ModelSamplingDiscreteFlow``
  with multiplier 1.0, shift 3.0 for Z-Image).
* ``context``: the Qwen3-4B hidden states of ONE caption, unpadded, in the compute dtype.
  NextDiT ignores the attention mask (``cap_mask = None`` in ``patchify_and_embed``) and pads
  the caption itself, with its learned ``cap_pad_token``, to a multiple of 32 tokens. So
  zero rows in the context would be attended to as tokens: the engine's
  ``TextBatch.collate`` pads captions of different lengths with zero rows on the right,
  and the adapter cuts those off again and calls the module once per caption length
  (``caption_lengths``), which is what ComfyUI does with one prompt per sample.
* ``num_tokens`` = the caption length (``extra_conds``'s value without a mask; unused by
  the forward); no pooled vector, no guidance input.

Target and sign (the derivation). The engine trains ``x_t = (1 - σ)·x0 + σ·ε`` against the
velocity ``v = ε - x0`` (``trainer_core.flow``). Inside ``NextDiT._forward`` the native model
sees ``t = 1 - σ`` (scaled by ``time_scale`` = 1000 in the timestep embedder), i.e. Z-Image's
own time runs from noise (t = 0) to data (t = 1), and its raw output r predicts the
native flow ``d x_t / d t = x0 - ε`` (musubi and ai-toolkit train r against x0 - ε).
``_forward`` returns ``-r``, so the module's output is ``ε - x0`` = ``v``; ComfyUI then
forms x0 = x_t - σ·v (``CONST.calculate_denoised``), which checks out:
x_t - σ(ε - x0) = (1 - σ)x0 + σε - σε + σx0 = x0. The adapter therefore returns the module
output unchanged, with the same convention as ``BflFlux``: no sign flip, no 1 - σ on our
side (ComfyUI's module does both).

Training through ComfyUI's blocks. ``JointTransformerBlock`` adds its residuals out of place
(``x = x + ...``), so plain autograd works without the guards ``BflFlux`` needs. ComfyUI's
fused rms-norm + rope kernel has no backward; the caller sets
``comfy.model_management.in_training`` (the bridge does), which selects the plain path.
NextDiT has no block-replacement hook, so the checkpoint modes wrap each block's
``forward`` (``layers``, ``noise_refiner``, ``context_refiner``) for the duration of one
call: ``off`` keeps every activation, ``blocks`` recomputes each block in backward,
``selective`` recomputes it but keeps matmul and attention outputs; ``auto`` runs
``blocks`` (no activation estimate for NextDiT yet). No memory planner or block streaming
for this family yet (``plan_memory`` is absent, so the engine makes no plan).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import torch
from torch import nn

from ..types import BflSlot, TextBatch
from .common import (CHECKPOINT_MODES, GRADIENT_CHECKPOINTING_MODE, ComfyModuleAdapter, checkpointed, module_device,
                     module_dtype)
from .families import FAMILIES
from .variants import ModelShape

log = logging.getLogger(__name__)

ARCH = "zimage"  # the family record (models.families): FLUX.1 VAE latents (16 ch, /8), 2×2 patches,
# LoRA format, metadata names and target presets (the main layers' qkv/out, + MLP for "all")
BLOCK_LISTS = ("context_refiner", "noise_refiner", "layers")


def caption_lengths(context: torch.Tensor) -> list[int]:
    """Per sample, the caption's token count: the rows up to its last non-zero row
    (``TextBatch.collate`` pads with zero rows on the right); at least 1."""
    nonzero = context.detach().abs().amax(dim=-1) > 0  # [B, T]
    idx = torch.arange(1, context.shape[1] + 1, device=context.device)
    return [max(1, int((row * idx).max().item())) for row in nonzero]


class NextDiTZImage(ComfyModuleAdapter):
    """``FlowModel`` over ComfyUI's ``NextDiT`` configured as Z-Image (see the module doc).

    ``arch``, ``guidance_embed``, ``latent_channels``, ``patch_size``, ``context_tokens``: what
    the bridge passes every adapter; checked against the module (Z-Image has no guidance
    input and no context padding). ``checkpoint``: one of ``CHECKPOINT_MODES`` or None
    (decided by ``prepare_for_training``).
    ``compute_dtype``: dtype of the module's inputs (ComfyUI's ``get_dtype_inference()``;
    default the first floating parameter's). ``autocast_dtype``: run under ``torch.autocast``
    in this dtype. ``precision_fixed``: ignore ``prepare_for_training``'s dtype.
    ``training_attention``: ``transformer_options["optimized_attention_override"]``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        arch: str = ARCH,
        guidance_embed: bool = False,
        latent_channels: Optional[int] = None,
        patch_size: Optional[int] = None,
        context_tokens: Optional[int] = None,
        checkpoint: Optional[str] = None,
        compute_dtype: Optional[torch.dtype] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        precision_fixed: bool = False,
        training_attention: Optional[Callable] = None,
    ):
        if checkpoint is not None and checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"NextDiTZImage checkpoint={checkpoint!r}; expected None or one of {list(CHECKPOINT_MODES)}")
        for name in ("x_embedder", "cap_embedder", *BLOCK_LISTS):
            if getattr(module, name, None) is None:
                raise ValueError(f"NextDiTZImage needs ComfyUI's NextDiT module (with '{name}'); got {type(module).__name__}")
        self.family = FAMILIES.get(arch)
        if self.family.adapter != f"{__name__}:{type(self).__name__}":
            raise ValueError(f"NextDiTZImage arch={arch!r}: that family runs through {self.family.adapter}")
        given = {"guidance_embed": (guidance_embed, False), "context_tokens": (context_tokens, None),
                 "latent_channels": (latent_channels, int(module.in_channels)),
                 "patch_size": (patch_size, int(module.patch_size))}
        for name, (value, actual) in given.items():  # the bridge passes ComfyUI's values: they must agree
            if value is not None and value != actual:
                raise ValueError(f"NextDiTZImage {name}={value!r}, but this NextDiT module has {actual!r}")
        self.arch = arch
        self.module = module
        self.lora_format = self.family.lora_format
        self.patch_size = int(module.patch_size)
        self.latent_channels = int(module.in_channels)
        self.pixel_multiple = self.family.vae_factor * self.patch_size
        self.checkpoint_setting = checkpoint
        self.checkpoint = checkpoint or GRADIENT_CHECKPOINTING_MODE
        self.compute_dtype = compute_dtype or module_dtype(module)
        self.autocast_dtype = autocast_dtype
        self.precision_fixed = precision_fixed
        self.training_attention = training_attention
        self.default_targets: dict[str, str] = dict(self.family.target_presets)
        self.device: Optional[torch.device] = None
        self.memory_plan = None  # no memory planner for NextDiT yet (the engine makes no plan)

    # ------------------------------------------------------------------ FlowModel
    def bfl_name(self, module_name: str) -> Optional[BflSlot]:
        """The LoRA file names ComfyUI's own names (``diffusion_model.<name>``, which
        ``comfy.lora.model_lora_keys_unet`` maps for every weight): identity, unfused."""
        return BflSlot(module_name)

    def model_shape(self) -> ModelShape:
        """For ``models.variants``: width, main layers (as ``double``), caption width."""
        m = self.module
        return ModelShape(family=self.arch, hidden=int(m.x_embedder.weight.shape[0]), double=len(m.layers), single=0,
                          context=int(m.cap_embedder[1].weight.shape[1]), guidance=False)

    def velocity(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        text: TextBatch,
        guidance: Optional[float] = None,
    ) -> torch.Tensor:
        """Velocity ``ε - x0`` [B, C, h, w] float32 for ``x_t`` [B, C, h, w] at σ [B] in (0, 1).
        ``text.context`` [B, T, D] (zero rows on the right are padding); ``text.pooled`` and
        ``guidance`` are ignored (Z-Image has neither)."""
        self._check_inputs(x_t, sigma, text.context)
        b, c, h, w = x_t.shape
        dtype, device = self.compute_dtype, module_device(self.module)
        x = x_t.to(device=device, dtype=dtype)
        t = sigma.to(device=device, dtype=torch.float32)
        context = text.context.to(device=device, dtype=dtype)
        lengths = caption_lengths(context)
        out = torch.empty(b, c, h, w, device=device, dtype=torch.float32)
        with self._blocks_checkpointed():
            for length in sorted(set(lengths)):
                rows = [i for i, n in enumerate(lengths) if n == length]
                out[rows] = self._call(x[rows], t[rows], context[rows, :length], device).float()
        return out

    def _call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, device: torch.device) -> torch.Tensor:
        call = functools.partial(self.module, x, t, context, context.shape[1],
                                 transformer_options=self._transformer_options())
        return self._autocast(call, device)

    # ------------------------------------------------------------------ checkpointing
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, in the order the forward runs them."""
        return [blk for name in BLOCK_LISTS for blk in getattr(self.module, name)]

    @contextlib.contextmanager
    def _blocks_checkpointed(self):
        """Each block's ``forward`` wrapped in ``torch.utils.checkpoint`` for one call
        (nothing while grad is off or in mode ``off``); the blocks are as before afterwards."""
        mode = "blocks" if self.checkpoint == "auto" else self.checkpoint
        if mode == "off" or not torch.is_grad_enabled():
            yield
            return
        wrapped = []
        try:
            for blk in self.blocks():
                own = blk.__dict__.get("forward")
                original = blk.forward

                def run(*args, _fn=original, **kw):
                    return checkpointed(_fn, *args, mode=mode, **kw)

                blk.forward = run
                wrapped.append((blk, own))
            yield
        finally:
            for blk, own in wrapped:
                if own is None:
                    del blk.forward
                else:
                    blk.forward = own
