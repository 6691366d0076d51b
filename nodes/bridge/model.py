"""A ComfyUI MODEL → the engine's trainable flow model, in place.

``detect_arch(MODEL)`` says which family a MODEL is (``FAMILY_OF_MODEL``: ComfyUI model class →
``trainer_core.models.families`` name; nothing else in the bridge differs by family);
``training_model(MODEL, config)`` loads it the
way ComfyUI does, makes its module trainable in place (no second copy of the weights) and
yields the engine's adapter (see the package docstring for memory and streaming).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import comfy.model_base
import comfy.model_management
import torch

from trainer_core.lora.network import strip_lora_layers
from trainer_core.models.bfl_flux import CHECKPOINT_MODES
from trainer_core.models.families import FAMILIES, Family
from trainer_core.models.rope import apply_rope

from .weights import AutogradSafeWeights, quantized_layers

log = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FAMILY_OF_MODEL = {
    comfy.model_base.Flux: "flux1",  # FLUX.1 dev / schnell / Kontext
    comfy.model_base.Flux2: "flux2",  # FLUX.2 dev / Klein
    comfy.model_base.Chroma: "chroma",
    comfy.model_base.Lumina2: {"ZImage": "zimage"},  # Z-Image (not Lumina 2 itself: Gemma 2, another record)
}
"""ComfyUI model class (``MODEL.model``, matched by EXACT type: ``Flux2`` and ``Chroma``
subclass ``Flux`` but call their module differently) → family name, or → {ComfyUI model
config class name → family} when one model class serves several (``Lumina2``: Lumina 2 and
Z-Image). The one place the bridge learns a family; a MODEL of any other class is refused."""


@dataclass(frozen=True)
class ArchInfo:
    arch: str  # the family name (FAMILY_OF_MODEL)
    guidance_embed: bool
    latent_channels: int
    patch_size: int
    model_type_name: str  # ComfyUI model config class: "Flux", "FluxSchnell", "Flux2", ...

    @property
    def family(self) -> Family:
        return FAMILIES.get(self.arch)


def detect_arch(model_patcher) -> ArchInfo:
    """Which family a ComfyUI MODEL is (``FAMILY_OF_MODEL``); a ValueError naming the model
    and the supported families otherwise."""
    base = getattr(model_patcher, "model", None)
    config = getattr(base, "model_config", None)
    arch = FAMILY_OF_MODEL.get(type(base))
    if isinstance(arch, dict):
        arch = arch.get(type(config).__name__)
    if arch is None:
        kind = type(config).__name__ if config is not None else type(base).__name__
        names = [n for v in FAMILY_OF_MODEL.values() for n in (v.values() if isinstance(v, dict) else (v,))]
        supported = ", ".join(FAMILIES.get(a).label for a in dict.fromkeys(names))
        raise ValueError(
            f"FlowTrain trains {supported} models; the MODEL input is a {kind} "
            f"({type(base).__module__}.{type(base).__name__}); load one of those with UNETLoader or CheckpointLoaderSimple"
        )
    unet = config.unet_config
    return ArchInfo(
        arch=arch,
        guidance_embed=bool(unet.get("guidance_embed", False)),
        latent_channels=int(base.latent_format.latent_channels),
        patch_size=int(base.diffusion_model.patch_size),
        model_type_name=type(config).__name__,
    )


def sdpa_attention(default, *args, **kwargs):
    """ComfyUI's attention override while training: always ``attention_pytorch`` (torch SDPA).
    ComfyUI picks its attention for inference: on a CPU a split/sub-quadratic kernel that
    materialises the T×T scores, on some GPUs sage attention, which has no backward. SDPA has
    fused forward and backward kernels on CPU and CUDA (flash / memory-efficient)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


@contextlib.contextmanager
def training_rope() -> Iterator[None]:
    """While training (``in_training``), FLUX's attention rotates q and k with
    ``trainer_core.models.rope.apply_rope``: the same fp32 rotation as ComfyUI's training path,
    with a backward that is the transposed rotation instead of autograd's broadcast reductions
    (about half the time). ComfyUI has no hook for RoPE, so ``comfy.ldm.flux.math.apply_rope``
    (which its ``attention`` calls) is swapped for the block and put back after; outside
    training (previews) ComfyUI's own function runs."""
    import comfy.ldm.flux.math as flux_math

    inference_rope = flux_math.apply_rope

    def rope(xq, xk, freqs_cis):
        if comfy.model_management.in_training:
            return apply_rope(xq, xk, freqs_cis)
        return inference_rope(xq, xk, freqs_cis)

    flux_math.apply_rope = rope
    try:
        yield
    finally:
        flux_math.apply_rope = inference_rope


@contextlib.contextmanager
def training_model(model_patcher, config=None) -> Iterator:
    """Load ``model_patcher`` fully (its patches, e.g. another LoRA, are merged into the
    weights by ComfyUI, so training happens on top of them) and yield the family's adapter
    (``Family.adapter_class()``: ``BflFlux``, ``NextDiTZImage``) over its live
    ``diffusion_model``, as ``config`` (a ``TrainingConfig``) says.

    ``config.train.gradient_checkpointing``: a mode from ``CHECKPOINT_MODES``.
    ``config.train.precision``: "auto" computes in the dtype ComfyUI runs the model in
    (``auto_compute_dtype``); "bf16"/"fp16"/"fp32" compute in that dtype (see
    ``_compute_dtypes``). The stored weights are never cast or copied; fp8 weights stay fp8
    (ComfyUI's layers cast them per forward).

    The MODEL is loaded (and unloaded) inside inference mode, as every node does, so its
    weights stay inference tensors and ``AutogradSafeWeights`` swaps them for the run. Loaded
    outside it, ComfyUI's quantized layers (``_quantized_apply``) turn the weights into normal
    ``QuantizedTensor``s, which the next node's ``unpatch_model`` (in inference mode) cannot
    wrap in a Parameter ("Cannot set version_counter for inference tensor").

    Inside the block: inference mode off, grad on, ``comfy.model_management.in_training``
    True (ComfyUI's fused rope has no backward otherwise). Everything is restored on exit,
    also on errors and interrupts. The caller must ``LoraNetwork.remove()`` before leaving.

    Memory is planned for ``config`` first (see the module docstring); the plan is
    ``model.memory_plan`` (pass it to ``train_lora(memory_plan=...)``). ``config=None``
    (tests, benchmarks): "auto" precision, "blocks" checkpointing and no memory plan.
    """
    from trainer_core.config import TrainConfig

    settings = config.train if config is not None else TrainConfig(precision="auto", gradient_checkpointing="blocks")
    precision, mode = settings.precision, settings.gradient_checkpointing
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {list(PRECISIONS)}")
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"gradient_checkpointing={mode!r}; expected one of {list(CHECKPOINT_MODES)}")
    info = detect_arch(model_patcher)
    mm = comfy.model_management
    previous = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        base = model_patcher.model
        module = base.diffusion_model
        compute, autocast = _compute_dtypes(base, PRECISIONS[precision])
        model = info.family.adapter_class()(  # BflFlux; NextDiTZImage for Z-Image
            module, arch=info.arch, guidance_embed=info.guidance_embed, latent_channels=info.latent_channels,
            patch_size=info.patch_size, context_tokens=info.family.context_tokens, checkpoint=mode,
            compute_dtype=compute, autocast_dtype=autocast, precision_fixed=True,
            training_attention=sdpa_attention,
        )
        model.device = mm.get_torch_device()
        planner = getattr(model, "plan_memory", None)  # an adapter without one (Z-Image) streams nothing
        if planner is None and config is not None and config.memory.streaming == "all":
            raise ValueError(f"memory.streaming='all': weight streaming is not available for {info.family.label} "
                             "yet; use 'auto' or 'off'")
        plan = planner(config) if config is not None and planner is not None else None  # refuses before loading
        model.memory_plan = plan
        own_placement = plan is not None and bool(plan.streamed) and model.device.type != "cpu"
        if own_placement:
            refuse_streaming(model_patcher, module, plan)
        with torch.inference_mode():  # load as nodes do (see the docstring: quantized weights)
            if own_placement:
                model_patcher.patch_model(device_to=model_patcher.offload_device)
            else:
                mm.load_models_gpu([model_patcher], force_full_load=True)
        weights = AutogradSafeWeights(module)
        try:
            converted = weights.apply()
            log.info("training %s (%s): %d inference tensors swapped, compute %s, autocast %s, checkpoint %s%s",
                     info.arch, info.model_type_name, converted, compute, autocast, mode,
                     f", {plan.summary()}" if plan is not None else "")
            mm.in_training = True
            with training_rope():
                yield model
        finally:
            mm.in_training = previous
            if hasattr(model, "release_streaming"):
                model.release_streaming()
            strip_lora_layers(module)
            weights.restore()
            if own_placement:
                with torch.inference_mode():
                    model_patcher.unpatch_model(device_to=model_patcher.offload_device)


def refuse_streaming(model_patcher, module, plan) -> None:
    """Raise (before anything is loaded) when this MODEL's weights cannot be streamed by
    FlowTrain on a GPU, saying why and the exact fix.

    * ComfyUI's dynamic VRAM (``ModelPatcherDynamic``, its default on NVIDIA GPUs) owns where
      every weight lives: it stages each layer's weights on the GPU per forward through its
      own virtual-memory buffers, which it may evict at any time, and it refuses to be
      patched outside its loader (``patch_model`` asserts ``load_weights=False``). Block
      streaming needs the classic patcher, which ComfyUI only gives by reloading the file
      (a second copy of the weights), so FlowTrain asks for the classic loader instead.
    * Quantized ``comfy_quant`` weights (``QuantizedTensor``) stream on the CPU (tested) but
      their GPU placement (pinned inner tensors, side-stream copies) has not run yet."""
    if getattr(model_patcher, "is_dynamic", lambda: False)():
        raise ValueError(
            f"{plan.summary()}: FlowTrain streams weights only on a MODEL loaded by ComfyUI's classic loader, but "
            "this one uses ComfyUI's dynamic VRAM (the default on NVIDIA GPUs). Fix: restart ComfyUI with "
            "--disable-dynamic-vram (e.g. python main.py --disable-dynamic-vram), or set the Trainer's "
            "memory_budget to 'unlimited' (memory.streaming='off') if the model fits your GPU")
    if quantized_layers(module):
        raise ValueError(
            f"{plan.summary()}: streaming a quantized (comfy_quant fp8-scaled) model on a GPU is not supported yet. "
            "Fix: load a bf16 file with UNETLoader weight_dtype 'fp8_e4m3fn' (plain fp8 weights stream), or set "
            "memory_budget to 'unlimited' if the quantized model fits your GPU")


LOW_PRECISION_WEIGHTS = {torch.bfloat16, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)}




def auto_compute_dtype(base) -> torch.dtype:
    """What precision "auto" trains in: ComfyUI's inference dtype, except that weights
    stored in bf16, fp8 or a quantized format train in bf16 where the device computes bf16
    natively. Such weights hold no more than bf16 precision, and ComfyUI's CPU default (fp32
    compute) would cast every weight on every forward for no accuracy gain; the LoRA itself
    stays in fp32."""
    inference = base.get_dtype_inference()
    low = base.get_dtype() in LOW_PRECISION_WEIGHTS or quantized_layers(base.diffusion_model) > 0
    if inference == torch.float32 and low and _bf16_native(next(base.diffusion_model.parameters()).device):
        return torch.bfloat16
    return inference


def _bf16_native(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _compute_dtypes(base, wanted: Optional[torch.dtype]) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype of the module's inputs, autocast dtype or None) for a requested precision.

    None ("auto"): ``auto_compute_dtype``, then as for that dtype. A dtype D: when ComfyUI's layers cast their weights to the input dtype
    per forward (manual-cast / fp8 models) or the weights already are D, feed D directly,
    as ComfyUI's own ``set_model_compute_dtype`` does (no weight copy when they match);
    otherwise (e.g. fp32 weights, bf16 asked) compute under ``torch.autocast(D)``."""
    if wanted is None:
        wanted = auto_compute_dtype(base)
        if wanted == base.get_dtype_inference():
            return wanted, None
    weight_dtype = base.get_dtype()
    casts = any(getattr(m, "comfy_cast_weights", False) for m in base.diffusion_model.modules())
    if casts or wanted == weight_dtype:
        return wanted, None
    if wanted == torch.float32:
        raise ValueError(
            f"precision='fp32' needs fp32 weights or casting layers, but this model holds {weight_dtype} weights "
            "that ComfyUI does not cast; load it in fp32 or choose precision 'auto'/'bf16'"
        )
    return weight_dtype, wanted
