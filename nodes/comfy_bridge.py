"""ComfyUI objects → the engine's protocols (imported only inside ComfyUI).

* ``detect_arch(MODEL)``: FLUX.1 (dev/schnell) or FLUX.2, else a ValueError naming the model.
* ``training_model(MODEL, ...)``: a context manager that loads the MODEL the way ComfyUI does,
  makes its FLUX module trainable in place (no second copy of the weights) and yields a
  ``BflFlux``. The caller injects and REMOVES the LoRA inside the ``with`` block
  (``LoraNetwork.remove()``, e.g. ``result.network.remove()`` after ``train_lora``), so the
  input MODEL's module is as before afterwards.

Memory (``training_model(..., config=TrainingConfig)``): the memory plan
(``trainer_core.budget``) is made from the module's shapes BEFORE anything is loaded, so a
run that cannot fit is refused without touching the model. Without streamed blocks the model
loads as before (``load_models_gpu(force_full_load=True)``). With streamed blocks the weights
are patched on ComfyUI's offload device (``ModelPatcher.patch_model(device_to=offload)``,
merging e.g. another LoRA into them) and ``trainer_core.streaming`` places them: resident
parts on the GPU, streamed blocks in pinned CPU memory (the same tensors, not a copy). We do
not use ComfyUI's lowvram partial loading: its per-op cast buffer is shared between layers,
so a weight autograd saved would be overwritten by the next layer's copy (see
SCALE-FAMILIES-FACTS §1.3), and it streams per Linear rather than per block. On exit every
weight goes back to the offload device and the patches are undone. ComfyUI's dynamic-VRAM
patcher (its CUDA default) cannot be patched outside its own loader, so streaming asks for
``--disable-dynamic-vram`` there. The streaming load path has only run on a CPU so far (GPU
figures pending).
* ``VaeCodec`` (VAE → LatentCodec), ``ClipTextEncoder`` (CLIP → TextEncoder),
  ``FixedConditioningEncoder`` (CONDITIONING → TextEncoder).
* ``model_with_lora``: a MODEL carrying a LoRA file's tensors, like core LoraModelLoader,
  refusing files with keys ComfyUI does not load.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import comfy.model_base
import comfy.model_management
import comfy.sd
import torch

from trainer_core.fingerprint import tensor_fingerprint
from trainer_core.models.bfl_flux import CHECKPOINT_MODES, GRADIENT_CHECKPOINTING_MODE, BflFlux
from trainer_core.types import TextEmbedding

log = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ArchInfo:
    arch: str  # "flux1" | "flux2"
    guidance_embed: bool
    latent_channels: int
    patch_size: int
    model_type_name: str  # ComfyUI model config class: "Flux", "FluxSchnell", "Flux2", ...


def detect_arch(model_patcher) -> ArchInfo:
    """Which FLUX a ComfyUI MODEL is. ``Flux2`` subclasses ``Flux``, so it is checked by exact
    type; other ``Flux`` subclasses (Chroma, LongCat) call their module differently and are refused."""
    base = getattr(model_patcher, "model", None)
    config = getattr(base, "model_config", None)
    if type(base) is comfy.model_base.Flux2:
        arch = "flux2"
    elif type(base) is comfy.model_base.Flux:
        arch = "flux1"
    else:
        kind = type(config).__name__ if config is not None else type(base).__name__
        raise ValueError(
            f"FlowTrain trains FLUX.1/FLUX.2 models; the MODEL input is a {kind} "
            f"({type(base).__module__}.{type(base).__name__}); load a FLUX model with UNETLoader or CheckpointLoaderSimple"
        )
    unet = config.unet_config
    return ArchInfo(
        arch=arch,
        guidance_embed=bool(unet.get("guidance_embed", False)),
        latent_channels=int(base.latent_format.latent_channels),
        patch_size=int(base.diffusion_model.patch_size),
        model_type_name=type(config).__name__,
    )


# ---------------------------------------------------------------------- training model
def _autograd_unsafe(t: torch.Tensor) -> bool:
    """An inference tensor, or an object created as one (after ``.data = ...`` it no longer
    reports ``is_inference()`` but still has no version counter)."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


class AutogradSafeWeights:
    """Swap ``module``'s inference-tensor parameters and buffers for normal tensors, and back.

    Weights made inside a prompt are inference tensors; autograd can neither save them for
    backward nor give them a version counter, and ``p.data = ...`` does not change that
    (the Parameter object itself is the inference tensor). ``apply`` therefore puts a new
    Parameter (``requires_grad=False``) holding a normal copy in each slot and empties the
    original's storage right away, one tensor at a time: the extra memory at any moment is
    one tensor, never the model. ``restore`` copies the values back into the ORIGINAL
    objects as inference tensors (again one tensor at a time) and puts them back, so the
    MODEL keeps the same Parameter objects, values, dtypes and kind. Non-inference parameters are left in place with ``requires_grad`` False while
    applied. A tensor subclass (ComfyUI's ``QuantizedTensor``) is handled through its inner
    tensors: the copy is a new wrapper of the same kind, still quantized."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.swaps: list[tuple[torch.nn.Module, str, bool, torch.Tensor, torch.Tensor]] = []
        self.flags: list[tuple[torch.nn.Parameter, bool]] = []

    def apply(self) -> int:
        done: dict[int, torch.Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():
            for owner in self.module.modules():
                for is_param, slots in ((True, owner._parameters), (False, owner._buffers)):
                    for name, t in list(slots.items()):
                        if t is None:
                            continue
                        if not _autograd_unsafe(t):
                            if is_param and id(t) not in done:
                                self.flags.append((t, t.requires_grad))
                                t.requires_grad_(False)
                            continue
                        new = done.get(id(t))
                        if new is None:
                            copy = _normal_copy(t)
                            new = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
                            done[id(t)] = new
                        slots[name] = new
                        self.swaps.append((owner, name, is_param, t, new))
        return len(done)

    def restore(self) -> None:
        moved: set[int] = set()
        with torch.no_grad():
            for owner, name, is_param, original, new in reversed(self.swaps):
                if id(original) not in moved:
                    _copy_back(original, new)
                    moved.add(id(original))
                (owner._parameters if is_param else owner._buffers)[name] = original
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.swaps, self.flags = [], []


def _inner_tensors(t: torch.Tensor) -> Optional[list[tuple[str, torch.Tensor]]]:
    """The plain tensors inside a wrapper tensor subclass (e.g. ComfyUI's ``QuantizedTensor``:
    its fp8 data and scales), by ``__tensor_flatten__``; None for a plain tensor."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return None
    names, _ctx = t.__tensor_flatten__()
    return [(n, getattr(t, n)) for n in names]


def _normal_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (autograd-safe) copy of ``t``; the original's storage is emptied at once.
    A wrapper subclass is rebuilt around copies of its inner tensors, so a quantized weight
    stays quantized (never dequantized, one layer's packed data copied at a time)."""
    inner = _inner_tensors(t)
    if inner is None:
        copy = t.data.clone()
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return copy
    _names, ctx = t.__tensor_flatten__()
    copies = {n: v.detach().clone() for n, v in inner}
    for _n, v in inner:
        v.data = torch.empty(0, dtype=v.dtype, device=v.device)
    return type(t).__tensor_unflatten__(copies, ctx, t.shape, t.stride())


def _copy_back(original: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new``'s values back into ``original`` (or its inner tensors) as inference tensors,
    so each object is exactly the kind it was (a normal tensor set into an inference object
    lacks a version counter); ``new`` is emptied."""
    inner = _inner_tensors(original)
    pairs = [(original, new)] if inner is None else [(v, w) for (_n, v), (_m, w) in zip(inner, _inner_tensors(new))]
    for target, source in pairs:
        with torch.inference_mode():
            data = source.data.clone()
        if inner is None:
            source.data = torch.empty(0, dtype=data.dtype, device=data.device)
        target.data = data


def sdpa_attention(default, *args, **kwargs):
    """ComfyUI's attention override while training: always ``attention_pytorch`` (torch SDPA).
    ComfyUI picks its attention for inference: on a CPU a split/sub-quadratic kernel that
    materialises the T×T scores, on some GPUs sage attention, which has no backward. SDPA has
    fused forward and backward kernels on CPU and CUDA (flash / memory-efficient)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def _resolve_mode(gradient_checkpointing) -> str:
    """A bool (True = ``GRADIENT_CHECKPOINTING_MODE``) or a mode name, e.g. "auto"."""
    if isinstance(gradient_checkpointing, str):
        if gradient_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"gradient_checkpointing={gradient_checkpointing!r}; expected a bool or one of {list(CHECKPOINT_MODES)}")
        return gradient_checkpointing
    return GRADIENT_CHECKPOINTING_MODE if gradient_checkpointing else "off"


@contextlib.contextmanager
def training_model(model_patcher, *, gradient_checkpointing=True, precision: str = "auto",
                   config=None) -> Iterator[BflFlux]:
    """Load ``model_patcher`` fully (its patches, e.g. another LoRA, are merged into the
    weights by ComfyUI, so training happens on top of them) and yield a ``BflFlux`` over its
    live ``diffusion_model``.

    ``gradient_checkpointing``: bool or a mode from ``CHECKPOINT_MODES``. ``precision``:
    "auto" computes in the dtype ComfyUI runs the model in (``get_dtype_inference()``);
    "bf16"/"fp16"/"fp32" compute in that dtype (see ``_compute_dtypes``). The stored weights
    are never cast or copied; fp8 weights stay fp8 (ComfyUI's layers cast them per forward).

    Inside the block: inference mode off, grad on, ``comfy.model_management.in_training``
    True (ComfyUI's fused rope has no backward otherwise). Everything is restored on exit,
    also on errors and interrupts. The caller must ``LoraNetwork.remove()`` before leaving.

    ``config`` (a ``TrainingConfig``): plan memory for it first (see the module docstring);
    the plan is ``model.memory_plan`` (pass it to ``train_lora(memory_plan=...)``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {list(PRECISIONS)}")
    info = detect_arch(model_patcher)
    mode = _resolve_mode(gradient_checkpointing)
    mm = comfy.model_management
    previous = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        base = model_patcher.model
        module = base.diffusion_model
        compute, autocast = _compute_dtypes(base, PRECISIONS[precision])
        model = BflFlux(
            module, arch=info.arch, guidance_embed=info.guidance_embed, latent_channels=info.latent_channels,
            patch_size=info.patch_size, context_tokens=512 if info.arch == "flux2" else None, checkpoint=mode,
            compute_dtype=compute, autocast_dtype=autocast, precision_fixed=True,
            training_attention=sdpa_attention,
        )
        model.device = mm.get_torch_device()
        plan = model.plan_memory(config) if config is not None else None  # refuses before loading
        model.memory_plan = plan
        own_placement = plan is not None and bool(plan.streamed) and model.device.type != "cpu"
        if own_placement:
            if getattr(model_patcher, "is_dynamic", lambda: False)():
                raise ValueError(
                    f"{plan.summary()}: weight streaming needs ComfyUI's classic model loading, but this MODEL uses "
                    "dynamic VRAM; start ComfyUI with --disable-dynamic-vram, or set memory_budget to 'unlimited' "
                    "if the model fits your GPU")
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
            yield model
        finally:
            mm.in_training = previous
            model.release_streaming()
            _strip_leftover_lora(module)
            if own_placement:
                module.to(model_patcher.offload_device)
            weights.restore()
            if own_placement:
                model_patcher.unpatch_model(device_to=model_patcher.offload_device)


LOW_PRECISION_WEIGHTS = {torch.bfloat16, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)}


def quantized_layers(module: torch.nn.Module) -> int:
    """How many layers hold a ComfyUI quantized weight (``comfy_quant`` files: a tensor
    subclass such as ``QuantizedTensor`` with fp8/int8/fp4 storage)."""
    return sum(1 for m in module.modules() if _inner_tensors(m._parameters.get("weight")) is not None)


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


def _strip_leftover_lora(module: torch.nn.Module) -> None:
    """Safety net for callers that did not ``LoraNetwork.remove()`` (e.g. an exception before
    they got the network): put back every base layer peft wrapped, so the shared MODEL is
    never left carrying LoRA layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft absent: nothing can have been injected
        return
    leftovers = [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in leftovers:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, getattr(parent, child).get_base_layer())
    if leftovers:
        vars(module).pop("peft_config", None)
        log.warning("removed %d LoRA layers left in the model after training", len(leftovers))


# ---------------------------------------------------------------------- identities
def weights_identity(state_dict: dict) -> str:
    """A short digest of a module's weights (names, shapes, dtypes, sampled values)."""
    return tensor_fingerprint(sorted(state_dict.items()))


# ---------------------------------------------------------------------- VAE
class VaeCodec:
    """``LatentCodec`` over a ComfyUI VAE and the MODEL's latent format.

    ``encode``: pixels [B, 3, H, W] in [-1, 1] → ``vae.encode`` ([B, H, W, 3] in [0, 1]) →
    ``process_latent_in`` (FLUX.1: (z - 0.1159)·0.3611; FLUX.2: identity, its VAE already
    returns 128 batch-normed channels at /16). ``decode`` is the inverse."""

    def __init__(self, vae, model_patcher):
        self.vae = vae
        self.base = model_patcher.model
        self.downscale = int(vae.spacial_compression_encode())
        fmt = type(self.base.latent_format).__name__
        self.identity = f"comfy-vae-{weights_identity(vae.get_sd())}-{fmt}"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"VaeCodec.encode expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        images = ((pixels.float().clamp(-1, 1) + 1) / 2).movedim(1, -1)
        with torch.inference_mode():
            latents = self.vae.encode(images)
            out = self.base.process_latent_in(latents)
        return out.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            images = self.vae.decode(self.base.process_latent_out(latents.float()))
        return (images.float().movedim(-1, 1) * 2 - 1).clone()

    def release(self) -> None:
        self.vae = None


# ---------------------------------------------------------------------- text
def _cond_embedding(cond: torch.Tensor, extras: dict, keep_pooled: bool) -> TextEmbedding:
    pooled = extras.get("pooled_output") if keep_pooled else None
    return TextEmbedding(
        context=cond[0].detach().float().cpu().clone(),
        pooled=None if pooled is None else pooled.reshape(-1).detach().float().cpu().clone(),
    )


class ClipTextEncoder:
    """``TextEncoder`` over a ComfyUI CLIP: each caption through ``clip.tokenize`` and
    ``clip.encode_from_tokens(..., return_pooled=True, return_dict=True)``. FLUX.2 has no
    pooled vector (``pooled`` None)."""

    def __init__(self, clip, arch):
        arch = getattr(arch, "arch", arch)  # an ArchInfo or its arch string
        if arch not in ("flux1", "flux2"):
            raise ValueError(f"ClipTextEncoder arch={arch!r}; expected 'flux1' or 'flux2'")
        self.clip, self.arch = clip, arch
        names = f"{type(clip).__name__}/{type(clip.cond_stage_model).__name__}"
        self.identity = f"comfy-clip-{names}-{weights_identity(clip.cond_stage_model.state_dict())}-{arch}"

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        if self.clip is None:
            raise RuntimeError("this ClipTextEncoder was released; captions must be encoded before release()")
        out = []
        with torch.inference_mode():
            for text in texts:
                enc = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True, return_dict=True)
                out.append(_cond_embedding(enc["cond"], enc, keep_pooled=self.arch == "flux1"))
        return out

    def release(self) -> None:
        self.clip = None


class FixedConditioningEncoder:
    """``TextEncoder`` that returns a fixed ComfyUI CONDITIONING (``[[cond [1, T, D],
    {"pooled_output": [1, P]}], ...]``; the first entry is used) for every caption: captions
    are IGNORED. ``select(caption)`` may return "class" to use ``class_conditioning``
    instead (e.g. captions without the trigger word); default: always "main"."""

    def __init__(self, conditioning, class_conditioning=None, select: Optional[Callable[[str], str]] = None):
        self.main = self._first(conditioning, "conditioning")
        self.cls = None if class_conditioning is None else self._first(class_conditioning, "class_conditioning")
        self.select = select or (lambda text: "main")
        h = hashlib.sha256()
        for emb in (self.main, self.cls):
            if emb is None:
                h.update(b"none")
                continue
            for t in (emb.context, emb.pooled):
                h.update(b"-" if t is None else f"{tuple(t.shape)}".encode() + t.numpy().tobytes())
        self.identity = f"comfy-cond-{h.hexdigest()[:16]}"

    @staticmethod
    def _first(conditioning, name: str) -> TextEmbedding:
        try:
            cond, extras = conditioning[0][0], conditioning[0][1]
        except (TypeError, IndexError, KeyError):
            raise ValueError(f"{name} is not a ComfyUI CONDITIONING ([[tensor, dict], ...])") from None
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
            raise ValueError(f"{name}[0][0] must be a [1, T, D] tensor, got {getattr(cond, 'shape', type(cond))}")
        return _cond_embedding(cond, extras, keep_pooled=True)

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        out = []
        for text in texts:
            which = self.select(text)
            if which not in ("main", "class"):
                raise ValueError(f"select({text!r}) returned {which!r}; expected 'main' or 'class'")
            if which == "class" and self.cls is None:
                raise ValueError("select() chose 'class' but no class_conditioning was given")
            out.append(self.main if which == "main" else self.cls)
        return out

    def release(self) -> None:
        pass


# ---------------------------------------------------------------------- LoRA → MODEL
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def model_with_lora(model_patcher, lora_tensors: dict, strength: float = 1.0):
    """A clone of ``model_patcher`` with ``lora_tensors`` added as weight patches (what core
    LoraModelLoader does). Raises ValueError if ComfyUI reports any key it did not load."""
    root = logging.getLogger()
    handler, level = _Collect(), root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    try:
        patched = comfy.sd.load_lora_for_models(model_patcher, None, lora_tensors, strength, 0)[0]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    bad = [m for m in handler.messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    if bad:
        raise ValueError(f"ComfyUI did not load {len(bad)} LoRA key(s), e.g. {bad[:3]}; the file does not fit this model")
    return patched
