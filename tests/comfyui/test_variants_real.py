"""Variant detection on ComfyUI's own FLUX module built with the real sizes on the meta
device (no memory, no weights): what the Trainer node sees for each model."""
from __future__ import annotations

import pytest

from trainer_core.models.variants import detect_variant, module_shape

FLUX1 = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
             num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
             qkv_bias=True, txt_ids_dims=[])
FLUX2 = dict(in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0, axes_dim=[32, 32, 32, 32], theta=2000,
             patch_size=1, qkv_bias=False, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False)
CASES = {
    "flux1-dev": ("flux1", dict(FLUX1, guidance_embed=True)),
    "flux1-schnell": ("flux1", dict(FLUX1, guidance_embed=False)),
    "flux2-dev": ("flux2", dict(FLUX2, hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48,
                                context_in_dim=15360, guidance_embed=True)),
    "klein-9b": ("flux2", dict(FLUX2, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                               context_in_dim=12288, guidance_embed=False)),
    "klein-4b": ("flux2", dict(FLUX2, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                               context_in_dim=7680, guidance_embed=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_comfyui_flux_modules_of_real_size_are_detected(comfyui, name):
    import comfy.ldm.flux.model
    import comfy.ops

    family, params = CASES[name]
    module = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **params)
    found = detect_variant(module_shape(module, family))
    assert (found.variant.name, found.how) == (name, "exact")
