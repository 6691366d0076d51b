"""``ModelShape`` of a model on disk, read from headers only (no weights loaded).

* a ``.safetensors`` file in BFL/ComfyUI layout (``double_blocks.N...``, optional
  ``model.diffusion_model.`` prefix): block counts, hidden size, context width and the
  stored dtype from the safetensors header;
* a diffusers folder (``transformer/config.json`` or ``config.json``) of FLUX.1
  (``FluxTransformer2DModel``) or FLUX.2 (``Flux2Transformer2DModel``).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from .memory import ModelShape, flux_shape

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def shape_from_safetensors(path: Path) -> ModelShape:
    header = {k: v for k, v in _header(path).items() if k != "__metadata__"}
    prefix = next((p for p in ("model.diffusion_model.", "") if f"{p}img_in.weight" in header), None)
    if prefix is None:
        raise ValueError(f"{path} is not a FLUX transformer in BFL/ComfyUI layout (no img_in.weight)")
    keys = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
    count = lambda kind: len({m.group(1) for k in keys if (m := re.match(rf"{kind}\.(\d+)\.", k))})  # noqa: E731
    arch = "flux2" if "double_stream_modulation_img.lin.weight" in keys else "flux1"
    hidden = keys["img_in.weight"]["shape"][0]
    context = keys["txt_in.weight"]["shape"][1]
    weight = keys["double_blocks.0.img_attn.qkv.weight"]["dtype"]
    return flux_shape(path.stem, arch, hidden, count("double_blocks"), count("single_blocks"), context,
                      guidance="guidance_in.in_layer.weight" in keys, weight_bytes=_DTYPE_BYTES.get(weight, 2))


def shape_from_diffusers(folder: Path) -> ModelShape:
    config_path = next((p for p in (folder / "transformer" / "config.json", folder / "config.json") if p.is_file()), None)
    if config_path is None:
        raise ValueError(f"{folder} has no transformer/config.json (a diffusers FLUX folder) ")
    c = json.loads(config_path.read_text(encoding="utf-8"))
    kind = c.get("_class_name", "")
    if kind not in ("FluxTransformer2DModel", "Flux2Transformer2DModel"):
        raise ValueError(f"{config_path}: {kind or 'unknown class'} is not a FLUX.1/FLUX.2 transformer")
    arch = "flux2" if kind.startswith("Flux2") else "flux1"
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    return flux_shape(folder.name, arch, hidden, c["num_layers"], c["num_single_layers"], c["joint_attention_dim"],
                      guidance=bool(c.get("guidance_embeds", False)))


def shape_from_path(path: str | Path) -> ModelShape:
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return shape_from_safetensors(path)
    if path.is_dir():
        return shape_from_diffusers(path)
    raise ValueError(f"{path}: expected a FLUX .safetensors file or a diffusers model folder")
