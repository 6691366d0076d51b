"""ComfyUI objects → the engine's protocols (imported only inside ComfyUI).

By concern: ``model`` (which model a MODEL is; ``training_model``), ``weights`` (autograd-safe
weights in place), ``encoders`` (VAE, CLIP, CONDITIONING), ``lora`` (a LoRA file → MODEL).

* ``detect_arch(MODEL)``: the model family (``FAMILY_OF_MODEL``, one entry per ComfyUI model
  class), else a ValueError naming the model and the supported families.
* ``training_model(MODEL, ...)``: a context manager that loads the MODEL the way ComfyUI does,
  makes its module trainable in place (no second copy of the weights) and yields the family's
  adapter (``BflFlux``; ``NextDiTZImage`` for Z-Image, which has no memory plan or streaming). The caller injects and REMOVES the LoRA inside the ``with`` block
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
``--disable-dynamic-vram`` there; streaming ``comfy_quant`` weights is refused on a GPU (it runs
and is tested on the CPU). Both refusals come before anything is loaded (``refuse_streaming``).
The streaming load path has only run on a CPU so far (GPU figures pending; docs/scale.md).
* ``VaeCodec`` (VAE → LatentCodec), ``ClipTextEncoder`` (CLIP → TextEncoder),
  ``FixedConditioningEncoder`` (CONDITIONING → TextEncoder).
* ``model_with_lora``: a MODEL carrying a LoRA file's tensors, like core LoraModelLoader,
  refusing files with keys ComfyUI does not load.
"""
from .encoders import ClipTextEncoder, FixedConditioningEncoder, VaeCodec, weights_identity
from .lora import model_with_lora
from .model import (FAMILY_OF_MODEL, PRECISIONS, ArchInfo, auto_compute_dtype, detect_arch, sdpa_attention,
                    training_model)
from .weights import AutogradSafeWeights, quantized_layers

__all__ = [
    "ArchInfo", "AutogradSafeWeights", "FAMILY_OF_MODEL", "ClipTextEncoder", "FixedConditioningEncoder", "PRECISIONS", "VaeCodec",
    "auto_compute_dtype", "detect_arch", "model_with_lora", "quantized_layers", "sdpa_attention",
    "training_model", "weights_identity",
]
