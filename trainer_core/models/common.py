"""What every model adapter needs: small facts about a module, the gradient-checkpoint modes
and policy, and ``ComfyModuleAdapter``, the shared part of the adapters over ComfyUI modules."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

log = logging.getLogger(__name__)


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU if none)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


COMPILE_SETTINGS = ("auto", "on", "off")


def resolve_compile(setting: str, device: torch.device) -> bool:
    """Whether ``train.compile`` compiles the transformer blocks on ``device``: "on"/"off" as
    said; "auto" only on a CUDA device with a working Triton (where compiled blocks are
    faster); on a CPU compiling costs minutes and gains little."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"train.compile={setting!r}; expected one of {list(COMPILE_SETTINGS)}")
    if setting != "auto":
        return setting == "on"
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- gradient checkpointing
CHECKPOINT_MODES = ("off", "blocks", "selective", "auto")
GRADIENT_CHECKPOINTING_MODE = "blocks"
"""What ``prepare_for_training(gradient_checkpointing=True)`` selects (see the benchmark)."""

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep matmul / attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(fn: Callable, *args, mode: str, **kwargs):
    """``fn(*args, **kwargs)`` under ``torch.utils.checkpoint`` (non-reentrant): ``blocks``
    recomputes everything in backward, ``selective`` keeps matmul and attention outputs."""
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)} \
        if mode == "selective" else {}
    return checkpoint(fn, *args, use_reentrant=False, **extra, **kwargs)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view, else the host's available RAM
    (0 when unknown, which makes ``auto`` checkpoint)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:  # optional: without it "auto" plays safe
        return 0
    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------- adapter base
class ComfyModuleAdapter:
    """What the adapters over a ComfyUI diffusion module (``BflFlux``, ``NextDiTZImage``) share.

    The subclass sets ``arch``, ``module``, ``latent_channels``, ``patch_size``,
    ``checkpoint_setting`` (a mode fixed at construction, or None), ``checkpoint``,
    ``compute_dtype``, ``autocast_dtype``, ``precision_fixed`` and ``training_attention``.
    """

    def image_tokens(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        return (h // self.patch_size) * (w // self.patch_size)

    def prepare_for_training(self, dtype: Optional[torch.dtype] = None, gradient_checkpointing: bool | str = True) -> None:
        """Pick the checkpoint mode (unless fixed at construction: a mode of ``CHECKPOINT_MODES``,
        or a bool, True = ``GRADIENT_CHECKPOINTING_MODE``) and, unless ``precision_fixed``,
        autocast to ``dtype`` when it differs from ``compute_dtype``."""
        if self.checkpoint_setting is None:
            if isinstance(gradient_checkpointing, str):
                if gradient_checkpointing not in CHECKPOINT_MODES:
                    raise ValueError(f"gradient_checkpointing={gradient_checkpointing!r}; expected one of {list(CHECKPOINT_MODES)}")
                self.checkpoint = gradient_checkpointing
            else:
                self.checkpoint = GRADIENT_CHECKPOINTING_MODE if gradient_checkpointing else "off"
        if dtype is not None and not self.precision_fixed:
            self.autocast_dtype = None if dtype == self.compute_dtype else dtype
        log.info("%s %s: checkpoint=%s compute=%s autocast=%s", type(self).__name__, self.arch, self.checkpoint,
                 self.compute_dtype, self.autocast_dtype)

    def _check_inputs(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> None:
        """Refuse latents of the wrong channels or size and batch sizes that disagree."""
        b, c, h, w = x_t.shape
        if c != self.latent_channels:
            raise ValueError(f"{self.arch} expects {self.latent_channels}-channel latents, got {c} channels")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"latent {h}×{w} is not a multiple of the patch size {self.patch_size}")
        if context.shape[0] != b or sigma.shape != (b,):
            raise ValueError(f"batch sizes disagree: latents {b}, context {context.shape[0]}, sigma {tuple(sigma.shape)}")

    def _transformer_options(self) -> dict:
        """``transformer_options`` every call passes: the training attention when one is set
        (also without grad, so a prior or validation pass computes the same)."""
        if self.training_attention is None:
            return {}
        return {"optimized_attention_override": self.training_attention}

    def _autocast(self, call: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        """``call()``, under ``torch.autocast`` in ``autocast_dtype`` when one is set."""
        if self.autocast_dtype is None:
            return call()
        with torch.autocast(device.type, dtype=self.autocast_dtype):
            return call()
