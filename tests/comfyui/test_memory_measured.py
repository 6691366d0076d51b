"""The memory estimator against what autograd really keeps, on ComfyUI's own FLUX blocks.

Measured: every tensor saved for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``) plus every tensor the forward left alive in
Python objects (checkpoint inputs and selective-checkpoint caches hold theirs there), each
storage counted once, weights excluded. Attention runs through PyTorch SDPA as on a GPU
(the CPU default, sub-quadratic attention, keeps different intermediates).
"""
from __future__ import annotations

import gc

import pytest
import torch

from trainer_core import memory
from trainer_core.config import LoRAConfig
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux
from trainer_core.types import TextBatch

TXT = 7


def kept_bytes(model: BflFlux, x, sigma, text) -> int:
    """Bytes autograd keeps from one forward until its backward (see module docstring)."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.module.parameters()) + list(model.module.buffers())}
    skip |= {t.untyped_storage().data_ptr() for t in (x, sigma, text.context) + ((text.pooled,) if text.pooled is not None else ())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.velocity(x, sigma, text, 1.0)
    skip.add(out.untyped_storage().data_ptr())
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and id(o) not in before and o.device.type != "meta":
            pack(o)
    out.pow(2).mean().backward()
    return sum(seen.values())


@pytest.fixture(scope="module")
def sdpa_attention(comfyui):
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention

    previous = flux_math.optimized_attention
    flux_math.optimized_attention = attention.attention_pytorch
    yield
    flux_math.optimized_attention = previous


CASES = [  # arch, latent side, batch, checkpoint, compute dtype, LoRA dtype, targets[, hidden]
    ("flux1", 16, 1, "off", torch.float32, "fp32", "all"),
    ("flux1", 16, 1, "off", torch.bfloat16, "fp32", "all", 512),  # another hidden size
    ("flux2", 8, 1, "selective", torch.bfloat16, "fp32", "attention", 512),
    ("flux1", 24, 2, "off", torch.bfloat16, "fp32", "attention"),
    ("flux1", 32, 1, "blocks", torch.bfloat16, "fp32", "all"),
    ("flux1", 16, 2, "selective", torch.float32, "fp32", "all"),
    ("flux1", 24, 1, "selective", torch.bfloat16, "bf16", "attention"),
    ("flux2", 8, 2, "off", torch.bfloat16, "fp32", "all"),
    ("flux2", 12, 1, "off", torch.float32, "fp32", "attention"),
    ("flux2", 16, 1, "blocks", torch.float32, "fp32", "all"),
    ("flux2", 12, 2, "selective", torch.bfloat16, "fp32", "all"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_activation_estimate_within_15_percent_of_saved_bytes(comfyui, sdpa_attention, tmp_path, case):
    import comfy.model_management as mm

    arch, side, batch, mode, dtype, lora_dtype, targets, *rest = case
    hidden = rest[0] if rest else 256
    path = comfyui.write_tiny_flux(tmp_path / "m.safetensors", arch, guidance=arch == "flux1", hidden=hidden,
                                   depth=2, depth_single=3, context_dim=64)
    module = comfyui.load_flux(path, inference=False, dtype=dtype).model.diffusion_model
    channels, patch = (16, 2) if arch == "flux1" else (128, 1)
    model = BflFlux(module, arch=arch, guidance_embed=arch == "flux1", latent_channels=channels, patch_size=patch,
                    checkpoint=mode, compute_dtype=dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    rank = 8
    net = LoraNetwork.inject(module, LoRAConfig(rank=rank, alpha=8.0, dtype=lora_dtype), model.default_targets[targets])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=g)
    text = TextBatch(torch.randn(batch, TXT, 64, generator=g), torch.randn(batch, 32, generator=g) if arch == "flux1" else None)
    previous = mm.in_training
    mm.in_training = True
    try:
        measured = kept_bytes(model, x, torch.rand(batch, generator=g), text)
    finally:
        mm.in_training = previous
        net.remove()
    tokens = model.image_tokens((side, side)) + TXT
    run = memory.RunShape(batch=batch, rank=rank, targets=targets, lora_bytes=4 if lora_dtype == "fp32" else 2,
                          compute_bytes=torch.finfo(dtype).bits // 8, tokens=tokens)
    shape = memory.shape_from_module(module, arch)
    kept, _peak = memory.activation_terms(shape, run, mode)
    assert abs(kept - measured) <= 0.15 * measured, (kept, measured, kept / measured)
