"""Tiny random Z-Image diffusion-model files and loading them through ComfyUI's UNETLoader path.

``zimage_state_dict`` writes every weight of ComfyUI's ``comfy.ldm.lumina.model.NextDiT`` in its
Z-Image configuration under the real key names (``x_embedder``, ``cap_embedder.{0,1}``,
``t_embedder.mlp.{0,2}``, ``noise_refiner.N`` / ``context_refiner.N`` / ``layers.N`` with
``attention.qkv|out|q_norm|k_norm``, ``feed_forward.w1|w2|w3``, the four RMSNorms and
``adaLN_modulation.0``, ``final_layer``, ``x_pad_token``/``cap_pad_token``), at a tiny width.

Why loading needs ``zimage_detection()``. ComfyUI's own detection (``comfy/model_detection.py``)
recognises these keys as the Lumina2 architecture and reads the width, caption width and
layer count from them, but it sets Z-Image's constants (30 heads of 128, rope axes 32/48/48,
theta 256, SwiGLU ×8/3, ``z_image_modulation``, ``time_scale`` 1000, pad tokens to 32) only
for a width of exactly 3840, and ``supported_models.ZImage`` matches only ``dim`` 3840, so
any ComfyUI-detected Z-Image has ~725 M parameters at least. The context manager lets a
tiny file through: for a Lumina2 state dict with a ``cap_pad_token`` and another width it
adds those same constants (heads = width / 128, so the head dim stays 128) and returns
ComfyUI's ``ZImage`` model config; everything else is ComfyUI's real loader
(``comfy.sd.load_diffusion_model``: dtype choice, ``model_base.Lumina2``, weight loading,
``ModelPatcher``). Width ≥ 256 is needed (Z-Image's adaLN input is 256 wide).
``harness.load_flux`` (the tests' UNETLoader) loads under it, so these files load like any
other tiny model (``harness.TINY_MODELS["zimage"]``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

HEAD_DIM = 128
T_FREQ = 256  # TimestepEmbedder frequency size and Z-Image's adaLN input width
REAL_DIM = 3840


def _linear(sd, name, out_f, in_f, bias, g, std, bias_std=None):
    sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * std
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * (std if bias_std is None else bias_std)


def _ffn_width(dim: int) -> int:
    hidden = int(dim * 8.0 / 3.0)
    return 256 * ((hidden + 255) // 256)  # NextDiT FeedForward, multiple_of 256


def zimage_state_dict(*, dim: int = 256, n_layers: int = 1, n_refiner: int = 2, cap_dim: int = 64,
                      seed: int = 0, std: float = 0.05, gate_bias: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """NextDiT (Z-Image layout) weights. Linear weights N(0, std²); RMSNorm scales 1; the
    adaLN biases N(0, gate_bias²) so the blocks' tanh gates are open (a LoRA on the main
    layers then moves the output measurably)."""
    if dim % HEAD_DIM or dim < T_FREQ:
        raise ValueError(f"dim={dim} must be a multiple of {HEAD_DIM} and at least {T_FREQ}")
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    ffn, patch_in = _ffn_width(dim), 2 * 2 * 16

    def block(p: str, adaln: bool) -> None:
        _linear(sd, f"{p}.attention.qkv", 3 * dim, dim, False, g, std)
        _linear(sd, f"{p}.attention.out", dim, dim, False, g, std)
        sd[f"{p}.attention.q_norm.weight"] = torch.ones(HEAD_DIM)
        sd[f"{p}.attention.k_norm.weight"] = torch.ones(HEAD_DIM)
        _linear(sd, f"{p}.feed_forward.w1", ffn, dim, False, g, std)
        _linear(sd, f"{p}.feed_forward.w2", dim, ffn, False, g, std)
        _linear(sd, f"{p}.feed_forward.w3", ffn, dim, False, g, std)
        for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            sd[f"{p}.{n}.weight"] = torch.ones(dim)
        if adaln:
            _linear(sd, f"{p}.adaLN_modulation.0", 4 * dim, T_FREQ, True, g, std, gate_bias)

    _linear(sd, "x_embedder", dim, patch_in, True, g, std * 4)
    for i in range(n_refiner):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    _linear(sd, "t_embedder.mlp.0", min(dim, 1024), T_FREQ, True, g, std)
    _linear(sd, "t_embedder.mlp.2", T_FREQ, min(dim, 1024), True, g, std)
    sd["cap_embedder.0.weight"] = torch.ones(cap_dim)
    _linear(sd, "cap_embedder.1", dim, cap_dim, True, g, std)
    for i in range(n_layers):
        block(f"layers.{i}", True)
    _linear(sd, "final_layer.linear", patch_in, dim, True, g, std * 4)
    _linear(sd, "final_layer.adaLN_modulation.1", dim, T_FREQ, True, g, std)
    sd["x_pad_token"] = torch.randn(1, dim, generator=g)
    sd["cap_pad_token"] = torch.randn(1, dim, generator=g)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_zimage(path: str | os.PathLike, **kw) -> Path:
    """Write ``zimage_state_dict(**kw)`` to ``path`` (safetensors); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(zimage_state_dict(**kw), str(path), metadata={"format": "pt", "note": "random Z-Image for tests"})
    return path


def zimage_constants(dim: int) -> dict:
    """What ``comfy.model_detection`` adds for a Z-Image of width 3840, at width ``dim``
    (only the head count scales: the head dim stays 128)."""
    heads = dim // HEAD_DIM
    return {"n_heads": heads, "n_kv_heads": heads, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
            "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
            "time_scale": 1000.0, "pad_tokens_multiple": 32}


@contextlib.contextmanager
def zimage_detection():
    """While active, ComfyUI's model detection also returns its ``ZImage`` config for tiny
    Z-Image state dicts (see the module docstring); other files detect as always."""
    import comfy.model_detection as md
    import comfy.supported_models

    original = md.model_config_from_unet

    def detect(state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
        config = md.detect_unet_config(state_dict, unet_key_prefix, metadata=metadata)
        tiny = (config is not None and config.get("image_model") == "lumina2" and config["dim"] != REAL_DIM
                and f"{unet_key_prefix}cap_pad_token" in state_dict)
        if not tiny:
            return original(state_dict, unet_key_prefix, use_base_if_no_match=use_base_if_no_match, metadata=metadata)
        config.update(zimage_constants(config["dim"]))
        return comfy.supported_models.ZImage(config)

    md.model_config_from_unet = detect
    try:
        yield
    finally:
        md.model_config_from_unet = original


