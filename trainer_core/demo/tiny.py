"""A tiny FLUX.1-layout transformer for the embedded demo and the tests.

Same module tree and names as the real FLUX.1 (19 double + 38 single blocks, width 3072),
shrunk to 2 + 2 blocks of width 256 (4 heads × 64): 7.22 M parameters with the guidance
embedding (7.09 M without), so a demo training run fits in minutes on two CPU cores.
The text width (64) and pooled width (16) match ``demo.text.HashTextEncoder``'s defaults;
64 input channels = 16 latent channels packed 2×2, as ``demo.codec.DctCodec`` produces.
"""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

TINY_FLUX1_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=16,
    axes_dims_rope=(8, 28, 28),  # must sum to attention_head_dim
)


def tiny_flux1(seed: int = 0, guidance: bool = True) -> FluxTransformer2DModel:
    """A seeded, randomly initialised tiny FLUX.1 transformer (float32, CPU).

    ``guidance=True`` builds a dev-like model with a guidance embedding; False a
    schnell-like one without. The global RNG is left untouched (``fork_rng``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**TINY_FLUX1_CONFIG, guidance_embeds=guidance)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
