"""FLUX.1 / FLUX.2 through a module with ComfyUI's BFL call signature (no ComfyUI import).

``module(x [B, C, h, w], timestep [B], context [B, T, D], y=pooled|None, guidance=[B]|None,
transformer_options=...)`` returns the raw velocity [B, C, h, w]; this is
``comfy.ldm.flux.model.Flux.forward``. The adapter feeds it exactly what ComfyUI's sampler
does (``comfy/model_base.py`` ``BaseModel._apply_model``, ``Flux.extra_conds``,
``Flux2.extra_conds``):

* ``timestep = model_sampling.timestep(σ) = σ`` in float32 for FLUX.1-dev, schnell and FLUX.2
  (``ModelSamplingFlux.timestep`` is the identity; schnell's discrete-flow multiplier is 1.0);
  the module multiplies timestep and guidance by 1000 in its embedders.
* x, context, y and guidance in the model's inference dtype; guidance only for
  guidance-embedded models; y = the pooled CLIP-L vector for FLUX.1, None for FLUX.2.
* FLUX.2 text context is left-padded with zeros to 512 tokens (``context_tokens``).
* ``BaseModel.apply_model`` returns x0 = x - σ·v; the module itself returns v = ε - x0,
  which is ``trainer_core.flow.velocity_target``'s convention.
* reference latents (edit models: FLUX.1 Kontext, FLUX.2) go to the module as ``ref_latents``
  (what ``Flux.extra_conds`` makes of ``ReferenceLatent`` conditioning), with
  ``ref_latents_method`` only when one is chosen; the module places their tokens
  (``models/references.py``) and returns the target tokens only.

Training through ComfyUI's blocks. They update their residual inputs in place
(``img += ...``, ``comfy/ldm/flux/layers.py``), after a LayerNorm saved that same tensor
for backward, so plain autograd fails ("modified by an inplace operation"), and
checkpoint recomputation would even read the mutated values. While gradients are on, every
block runs through ComfyUI's own replacement hook (``transformer_options["patches_replace"]
["dit"][("double_block"|"single_block", i)]``, see ``forward_orig``) with:

* the residual inputs cloned first (the caller's tensors are never mutated), and
* a ``TorchFunctionMode`` that hands ``layer_norm`` a copy of its input whenever that input
  is one of the block's residual tensors, so what autograd saves is never written later.

Checkpoint modes (``CHECKPOINT_MODES``): ``off`` keeps every activation; ``blocks`` recomputes
each block in backward (``torch.utils.checkpoint``, non-reentrant); ``selective`` recomputes
each block but keeps matmul and attention outputs (``create_selective_checkpoint_contexts``),
so only cheap elementwise ops run twice; ``auto`` estimates the activations a step keeps
(``activation_bytes``, from ``trainer_core.memory``) and runs ``off`` when they fit in half of
the free memory of the model's device, else ``blocks``: no recompute when there is room, no OOM
when there is not.

Memory plans (``plan_memory`` / ``apply_memory_plan``, called by ``session.train_lora``): the
budget planner (``trainer_core.budget``) fixes the checkpoint mode and which blocks stream
(``trainer_core.streaming.BlockStreamer``). The streamer's fetch/evict runs inside the
checkpointed block function, so the recompute in backward fetches the block again.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import budget as budget_mod
from .. import memory
from ..lora.bfl_names import bfl_identity
from ..streaming import BlockStreamer, block_table
from ..types import BflSlot, TextBatch
from .common import (  # noqa: F401 (CHECKPOINT_MODES, GRADIENT_CHECKPOINTING_MODE: this module's API too)
    CHECKPOINT_MODES,
    GRADIENT_CHECKPOINTING_MODE,
    ComfyModuleAdapter,
    checkpointed,
    free_memory,
    module_device,
    module_dtype,
)
from .families import FAMILIES
from .references import check_method, check_references

log = logging.getLogger(__name__)

ADAPTER = f"{__name__}:BflFlux"
"""``Family.adapter`` of the families this adapter calls."""

AUTO_MEMORY_FRACTION = 0.5  # of the device's free memory that "auto" lets activations take

class _CopyResidualsForNorms(TorchFunctionMode):
    """Inside one block: a ``layer_norm`` whose input shares storage with a residual stream
    gets a clone, so the tensor autograd saves is not the one the block then updates in place."""

    def __init__(self, residuals: tuple[torch.Tensor, ...]):
        super().__init__()
        self.storages = {r.untyped_storage().data_ptr() for r in residuals}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm and args and isinstance(args[0], torch.Tensor):
            if args[0].untyped_storage().data_ptr() in self.storages:
                args = (args[0].clone(), *args[1:])
        return func(*args, **kwargs)


class BflFlux(ComfyModuleAdapter):
    """``FlowModel`` over a ComfyUI-style BFL FLUX module (``comfy.ldm.flux.model.Flux``).

    ``arch``: a ``models.families`` name whose module has ComfyUI's BFL call signature
    ("flux1", "flux2", "chroma"); its record says how the module is fed (pooled vector,
    guidance input, VAE factor, LoRA format). ``guidance_embed``: the module has ``guidance_in``
    (FLUX.1-dev, FLUX.2-dev); ``latent_channels`` 16 (FLUX.1) / 128 (FLUX.2); ``patch_size`` 2 / 1
    (ComfyUI's values for the loaded module); ``context_tokens``: left-pad the text context with
    zeros to this many tokens (the bridge passes the family's ``context_tokens``; None = no padding).
    ``checkpoint``: one of ``CHECKPOINT_MODES``, or None = decided by
    ``prepare_for_training`` (``GRADIENT_CHECKPOINTING_MODE`` when asked for checkpointing,
    else "off"). ``compute_dtype``: dtype of the inputs given to the module (ComfyUI's
    ``get_dtype_inference()``; default the first floating parameter's dtype).
    ``autocast_dtype``: run the module under ``torch.autocast`` in this dtype (weights are
    never cast). ``precision_fixed``: ignore ``prepare_for_training``'s dtype.
    ``reference_method``: ``ref_latents_method`` for reference latents ("offset", "index",
    "uxo"); None = the module's own default (what ComfyUI uses when no node sets one).
    ``training_attention``: passed to the module as
    ``transformer_options["optimized_attention_override"]`` (ComfyUI calls it as
    ``fn(default_attention, q, k, v, heads, ...)``); the bridge uses it to train with SDPA.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        arch: str,
        guidance_embed: bool,
        latent_channels: int,
        patch_size: int,
        context_tokens: Optional[int] = None,
        checkpoint: Optional[str] = None,
        compute_dtype: Optional[torch.dtype] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        precision_fixed: bool = False,
        training_attention: Optional[Callable] = None,
        reference_method: Optional[str] = None,
    ):
        mine = [n for n in FAMILIES.names() if FAMILIES.get(n).adapter == ADAPTER]
        if arch not in mine:
            raise ValueError(f"BflFlux arch={arch!r}; expected one of {mine}")
        if checkpoint is not None and checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"BflFlux checkpoint={checkpoint!r}; expected None or one of {list(CHECKPOINT_MODES)}")
        for name in ("double_blocks", "single_blocks"):
            if not isinstance(getattr(module, name, None), nn.ModuleList):
                raise ValueError(
                    f"BflFlux needs a ComfyUI/BFL FLUX module with a '{name}' ModuleList; got {type(module).__name__}"
                )
        self.family = FAMILIES.get(arch)
        self.lora_format = self.family.lora_format
        vae_factor = self.family.vae_factor
        self.module = module
        self.arch = arch
        self.guidance_embed = bool(guidance_embed)
        self.latent_channels = int(latent_channels)
        self.patch_size = int(patch_size)
        self.pixel_multiple = vae_factor * self.patch_size
        self.context_tokens = context_tokens
        self.checkpoint_setting = checkpoint
        self.checkpoint = checkpoint or GRADIENT_CHECKPOINTING_MODE
        self._mode = self.checkpoint  # the concrete mode of the forward in flight
        self._auto_choices: dict[tuple[int, int], str] = {}
        self.compute_dtype = compute_dtype or module_dtype(module)
        self.autocast_dtype = autocast_dtype
        self.precision_fixed = precision_fixed
        self.training_attention = training_attention
        self.reference_method = check_method(reference_method)
        self.supports_references = self.family.references
        self.compile_blocks = False
        self._compiled: dict[int, Callable] = {}
        self.default_targets: dict[str, str] = dict(self.family.target_presets)
        self.streamer: Optional[BlockStreamer] = None
        self.device: Optional[torch.device] = None  # compute device when the weights are not there yet
        self.memory_plan: Optional[budget_mod.MemoryPlan] = None

    # ------------------------------------------------------------------ FlowModel
    def bfl_name(self, module_name: str) -> Optional[BflSlot]:
        """Submodule names of ComfyUI's FLUX module already are the BFL names."""
        return bfl_identity(module_name)

    def set_compile(self, enabled: bool, *, fallback: bool = False) -> None:
        """Run each transformer block through ``torch.compile`` (one compiled callable per
        block, made on first use; the module itself is not replaced, so LoRA injection,
        removal and checkpointing work as without). ``fallback``: if compiling fails (a
        forward raises), log it and train eagerly from then on instead of failing."""
        self.compile_blocks = bool(enabled)
        self.compile_fallback = fallback
        self._compiled.clear()

    def _block(self, blocks: nn.ModuleList, index: int) -> Callable:
        block = blocks[index]
        if not self.compile_blocks:
            return block
        if id(block) not in self._compiled:
            self._compiled[id(block)] = torch.compile(block)
        compiled = self._compiled[id(block)]
        if not getattr(self, "compile_fallback", False):
            return compiled

        def run(*args, **kwargs):
            if not self.compile_blocks:
                return block(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # torch.compile's failures are of many kinds; eager always works
                log.warning("torch.compile of the transformer blocks failed (%s: %s); training without it",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.compile_blocks = False
                return block(*args, **kwargs)

        return run

    def velocity(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        text: TextBatch,
        guidance: Optional[float] = None,
        references: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Velocity [B, C, h, w] float32 for ``x_t`` [B, C, h, w] at σ [B] in (0, 1).

        ``text.context`` [B, T, D]; ``text.pooled`` [B, P] (families with ``pooled``; ignored
        otherwise); ``guidance``: distilled guidance (guidance-embedded models only; None → 1.0);
        a family whose guidance input is ``zero`` (Chroma) always gets 0, as ComfyUI passes.
        ``references``: clean reference latents, each [B, C, h', w'] (edit families).
        """
        self._check_inputs(x_t, sigma, text.context)
        b, c = x_t.shape[:2]
        refs = check_references(references, b, c, self.patch_size)
        dtype, device = self.compute_dtype, module_device(self.module)
        context = text.context.to(device=device, dtype=dtype)
        if self.context_tokens is not None and context.shape[1] < self.context_tokens:
            context = nn.functional.pad(context, (0, 0, self.context_tokens - context.shape[1], 0))
        y = None
        if self.family.pooled and text.pooled is not None:
            y = text.pooled.to(device=device, dtype=dtype)
        g = None
        if self.family.guidance == "zero":
            g = torch.zeros((b,), device=device, dtype=dtype)
        elif self.guidance_embed:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=device, dtype=dtype)
        self._mode = self.checkpoint
        if self.checkpoint == "auto":
            tokens = sum(self.image_tokens(tuple(t.shape[2:])) for t in [x_t, *refs])
            self._mode = self._fitting_mode(b, tokens + context.shape[1], device)
        options, extra = self._transformer_options(), {}
        if refs:
            extra["ref_latents"] = [r.to(device=device, dtype=dtype) for r in refs]
            if self.reference_method is not None:
                extra["ref_latents_method"] = self.reference_method
        if torch.is_grad_enabled() or self.streamer is not None:  # streamed blocks fetch in the hook
            options["patches_replace"] = {"dit": self._block_patches()}
        call = functools.partial(
            self.module,
            x_t.to(device=device, dtype=dtype),
            timestep=sigma.to(device=device, dtype=torch.float32),
            context=context,
            y=y,
            guidance=g,
            transformer_options=options,
            **extra,
        )
        return self._autocast(call, device).float()

    def memory_shape(self) -> memory.ModelShape:
        """The module's shape and weight bytes for the memory estimator."""
        return memory.shape_from_module(self.module, self.arch, text_tokens=self.context_tokens)

    def _elem(self) -> int:
        return torch.finfo(self.autocast_dtype or self.compute_dtype).bits // 8

    def activation_bytes(self, batch: int, tokens: int) -> int:
        """Estimated bytes autograd keeps for one forward without checkpointing
        (``trainer_core.memory.activation_terms``, LoRA on the attention layers)."""
        run = memory.RunShape(batch=batch, compute_bytes=self._elem(), tokens=tokens)
        return memory.activation_terms(self.memory_shape(), run, "off")[1]

    def _casts_weights(self) -> bool:
        weights = [p for p in self.module.double_blocks.parameters() if p.dim() == 2]
        return bool(weights) and (weights[0].dtype != (self.autocast_dtype or self.compute_dtype)
                                  or any(getattr(m, "comfy_cast_weights", False) for m in self.module.modules()))

    def plan_memory(self, config, device: Optional[torch.device] = None) -> budget_mod.MemoryPlan:
        """The plan for ``config`` (a ``TrainingConfig``) within ``config.memory``'s budget on
        the model's device; raises ``budget.MemoryBudgetError`` when nothing fits."""
        device = device or self.device or module_device(self.module)
        limit = budget_mod.resolve_budget(config.memory.budget_gb, config.memory.margin_gb, device)
        run = budget_mod.run_shape(config, compute_bytes=self._elem(), casts_weights=self._casts_weights())
        mode = self.checkpoint_setting or self.checkpoint
        return budget_mod.plan_memory(self.memory_shape(), run, limit, streaming=config.memory.streaming,
                                      checkpoint=mode)

    def apply_memory_plan(self, plan: budget_mod.MemoryPlan, device: Optional[torch.device] = None) -> None:
        """Use ``plan``'s checkpoint mode and stream its blocks (weights move to storage now)."""
        self.release_streaming()
        self.checkpoint = plan.checkpoint
        self.memory_plan = plan
        if plan.streamed:
            limit = None if plan.budget == budget_mod.UNLIMITED else plan.weight_limit
            device = device or self.device or module_device(self.module)
            self.streamer = BlockStreamer(block_table(self.module), plan.streamed, device,
                                          limit=limit)
            self.streamer.attach(self.module)
        log.info("memory plan: %s", plan.summary())

    def release_streaming(self) -> None:
        if self.streamer is not None:
            self.streamer.detach()
        self.streamer = None

    def _fitting_mode(self, batch: int, tokens: int, device: torch.device) -> str:
        key = (batch, tokens)
        if key not in self._auto_choices:
            need, free = self.activation_bytes(batch, tokens), free_memory(device)
            mode = "off" if need <= AUTO_MEMORY_FRACTION * free else "blocks"
            log.info("gradient checkpointing auto: %d tokens × batch %d keep ~%.2f GB of activations, "
                     "%.1f GB free on %s → %s", tokens, batch, need / 2**30, free / 2**30, device, mode)
            self._auto_choices[key] = mode
        return self._auto_choices[key]

    # ------------------------------------------------------------------ blocks
    def _block_patches(self) -> dict:
        patches = {}
        for i in range(len(self.module.double_blocks)):
            patches[("double_block", i)] = functools.partial(self._double, i)
        for i in range(len(self.module.single_blocks)):
            patches[("single_block", i)] = functools.partial(self._single, i)
        return patches

    def _run(self, fn: Callable, *residuals: torch.Tensor):
        """``fn(*clones)`` under the residual guard, with this adapter's checkpoint mode."""

        def guarded(*inputs):
            copies = tuple(t.clone() for t in inputs)
            with _CopyResidualsForNorms(copies):
                return fn(*copies)

        if self._mode == "off":
            return guarded(*residuals)
        return checkpointed(guarded, *residuals, mode=self._mode)

    def _fetched(self, name: str):
        """The block's weights on the device for the call (inside the checkpointed function,
        so a recompute fetches again); nothing to do without streaming."""
        return self.streamer.use(name) if self.streamer is not None else contextlib.nullcontext()

    def _double(self, index: int, args: dict, extra: dict) -> dict:
        # Call the block directly: ComfyUI's ``original_block`` closure binds the loop
        # variable ``block`` late, so a recompute in backward would run the wrong block.
        block = self._block(self.module.double_blocks, index)
        opts = dict(args.get("transformer_options") or {})
        vec, pe, mask = args["vec"], args["pe"], args.get("attn_mask")

        def fn(img, txt):
            with self._fetched(f"double_blocks.{index}"):
                return block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)

        img, txt = self._run(fn, args["img"], args["txt"])
        return {"img": img, "txt": txt}

    def _single(self, index: int, args: dict, extra: dict) -> dict:
        block = self._block(self.module.single_blocks, index)
        opts = dict(args.get("transformer_options") or {})
        vec, pe, mask = args["vec"], args["pe"], args.get("attn_mask")

        def fn(img):
            with self._fetched(f"single_blocks.{index}"):
                return block(img, vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)

        return {"img": self._run(fn, args["img"])}

