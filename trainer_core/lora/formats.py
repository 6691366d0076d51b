"""LoRA file formats that ComfyUI's LoraLoader reads, on BFL module names.

Everything goes through one intermediate, ``BflDeltas``: BFL module name → (down [R, in],
up [out, R], scale), meaning ΔW = scale · up @ down (the kohya/ComfyUI convention, with
scale = alpha / R; ComfyUI uses 1.0 when a file has no alpha).

Fused BFL weights. diffusers splits BFL's ``img_attn.qkv`` into to_q/to_k/to_v and a single
block's ``linear1`` into to_q/to_k/to_v/proj_mlp (row slices; see ``bfl_names``). Trained
parts i with (A_i [r_i, in], B_i [n_i, r_i], scale s_i) are written exactly as one LoRA:

    down = cat_i A_i                      [Σ r_i, in]
    up   = block-diagonal: rows of part i (offset Σ_{j<i} n_j) × columns of A_i hold
           B_i · s_i / s, zeros elsewhere (untrained parts stay zero)  [Σ n_j, Σ r_i]
    scale s = s_0, so that up @ down · s = the stacked ΔW_i exactly.

Registered formats (``LORA_FORMATS``):
- ``flux1_kohya``: ``lora_unet_<bfl name, dots → _>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (scalar fp32, alpha = s · R), as kohya's sd-scripts writes for FLUX.1.
- ``flux2_diffusion_model``: ``diffusion_model.<bfl name>.lora_A.weight`` / ``.lora_B.weight``,
  no alpha; the scale is folded into B (ComfyUI then uses scale 1), as ai-toolkit writes.
- ``zimage_diffusion_model``: the same layout on ComfyUI's NextDiT names (fused
  ``attention.qkv``, ``attention.out``, ``feed_forward.w1|w2|w3``), which
  ``comfy.lora.model_lora_keys_unet`` maps for every weight of a Lumina2/Z-Image model, so
  nothing is split. (Diffusers-named files, ``attention.to_q|to_k|to_v``, also load in
  ComfyUI as slices of ``qkv``; kohya-style ``lora_unet_layers_*`` names do not.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer_core.lora.network import LoraNetwork, LoraWeights
from trainer_core.registry import Registry
from trainer_core.types import BflSlot

BflDeltas = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""BFL module name → (down [R, in] fp32, up [out, R] fp32, scale); ΔW = scale · up @ down."""

BflNamer = Callable[[str], BflSlot | None]


def to_bfl(weights: LoraWeights, bfl_name: BflNamer) -> BflDeltas:
    """Group a network's per-module (A, B, scale) by BFL module, fusing split parts exactly."""
    groups: dict[str, list[tuple[BflSlot, str, torch.Tensor, torch.Tensor, float]]] = {}
    for module_name, (a, b, scale) in weights.items():
        slot = bfl_name(module_name)
        if slot is None:
            raise ValueError(
                f"trained module {module_name!r} has no BFL (ComfyUI) counterpart, so it cannot be saved in a "
                "ComfyUI LoRA file; exclude it from lora.target_regex"
            )
        groups.setdefault(slot.name, []).append((slot, module_name, a.float(), b.float(), float(scale)))
    out: BflDeltas = {}
    for name, parts in groups.items():
        if not parts[0][0].fused:
            if len(parts) > 1:
                raise ValueError(f"modules {[p[1] for p in parts]} all map to the unfused BFL module {name!r}")
            _, _, a, b, scale = parts[0]
            out[name] = (a, b, scale)
            continue
        out[name] = _fuse(name, parts)
    return out


def _fuse(name: str, parts: list) -> tuple[torch.Tensor, torch.Tensor, float]:
    sizes = parts[0][0].sizes
    if any(p[0].sizes != sizes for p in parts) or len({p[0].part for p in parts}) != len(parts):
        raise ValueError(f"inconsistent fused slots for BFL module {name!r}: {[(p[1], p[0]) for p in parts]}")
    parts = sorted(parts, key=lambda p: p[0].part)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    scale = parts[0][4]
    down = torch.cat([p[2] for p in parts], dim=0)
    up = torch.zeros(sum(sizes), down.shape[0], dtype=torch.float32)
    col = 0
    for slot, module_name, a, b, s in parts:
        rows = sizes[slot.part]
        if b.shape[0] != rows:
            raise ValueError(f"{module_name!r} has {b.shape[0]} output rows but its slot in {name!r} has {rows}")
        up[offsets[slot.part] : offsets[slot.part] + rows, col : col + a.shape[0]] = b * (s / scale)
        col += a.shape[0]
    return down, up, scale


def merge_into(module: nn.Module, bfl_name: BflNamer, deltas: BflDeltas, multiplier: float = 1.0) -> list[str]:
    """Add multiplier · scale · up @ down into the weights of ``module``'s own Linear layers,
    splitting fused BFL rows back to the submodules ``bfl_name`` maps there. Returns the
    module names changed. Every BFL entry must land somewhere, else ValueError."""
    used, changed = set(), []
    with torch.no_grad():
        for n, m in module.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            slot = bfl_name(n)
            if slot is None or slot.name not in deltas:
                continue
            down, up, scale = deltas[slot.name]
            dw = (up.float() @ down.float()) * (scale * multiplier)
            if slot.fused:
                start = sum(slot.sizes[: slot.part])
                if dw.shape[0] != sum(slot.sizes):
                    raise ValueError(
                        f"LoRA for {slot.name!r} has {dw.shape[0]} rows; the model's has {sum(slot.sizes)}"
                    )
                dw = dw[start : start + slot.sizes[slot.part]]
            if tuple(dw.shape) != tuple(m.weight.shape):
                raise ValueError(
                    f"LoRA for {slot.name!r} gives ΔW {tuple(dw.shape)} but {n!r} has weight {tuple(m.weight.shape)}: "
                    "the file was trained for a different model size"
                )
            m.weight.copy_((m.weight.float() + dw.to(m.weight.device)).to(m.weight.dtype))
            used.add(slot.name)
            changed.append(n)
    unused = sorted(set(deltas) - used)
    if unused:
        raise ValueError(
            f"LoRA modules {unused[:8]} have no counterpart in this model (is the file for another model?)"
        )
    return changed


# ---------------------------------------------------------------------- kohya stems
_COMPOUNDS = sorted(
    [
        "double_stream_modulation_img",
        "double_stream_modulation_txt",
        "single_stream_modulation",
        "adaLN_modulation",
        "double_blocks",
        "single_blocks",
        "guidance_in",
        "final_layer",
        "vector_in",
        "out_layer",
        "in_layer",
        "img_attn",
        "txt_attn",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "time_in",
        "img_in",
        "txt_in",
    ],
    key=len,
    reverse=True,
)
_BFL_GRAMMAR = re.compile(
    r"double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.\d+|mod\.lin)"
    r"|single_blocks\.\d+\.(?:linear1|linear2|modulation\.lin)"
    r"|img_in|txt_in|(?:time_in|vector_in|guidance_in)\.(?:in_layer|out_layer)"
    r"|final_layer\.(?:linear|adaLN_modulation\.1)"
    r"|(?:double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin"
)


def kohya_stem(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def bfl_from_kohya_stem(stem: str) -> str:
    """Invert ``kohya_stem`` for FLUX BFL names (underscores inside names such as
    ``img_attn`` are kept); an unknown stem raises."""
    if not stem.startswith("lora_unet_"):
        raise ValueError(f"kohya LoRA key {stem!r} does not start with 'lora_unet_' (not a FLUX transformer LoRA key)")
    s = stem[len("lora_unet_") :]
    for c in _COMPOUNDS:
        s = s.replace(c, c.replace("_", "\0"))
    name = s.replace("_", ".").replace("\0", "_")
    if not _BFL_GRAMMAR.fullmatch(name):
        raise ValueError(f"kohya LoRA key {stem!r} names no FLUX BFL module this loader knows (read as {name!r})")
    return name


def _split_keys(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        suffix = next((s for s in suffixes if k.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"LoRA key {k!r} ends in none of {list(suffixes)}")
        out.setdefault(k[: -len(suffix)], {})[suffix] = v
    return out


def _pair(stem: str, down: torch.Tensor | None, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if down is None or up is None:
        raise ValueError(f"LoRA {stem!r} lacks its down/A or up/B matrix")
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"LoRA {stem!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not share a rank")
    return down.float(), up.float()


def _kohya_encode(deltas: BflDeltas, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up, scale) in deltas.items():
        stem = kohya_stem(name)
        out[f"{stem}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def _kohya_decode(tensors: dict[str, torch.Tensor]) -> BflDeltas:
    out: BflDeltas = {}
    for stem, parts in _split_keys(tensors, (".lora_down.weight", ".lora_up.weight", ".alpha")).items():
        down, up = _pair(stem, parts.get(".lora_down.weight"), parts.get(".lora_up.weight"))
        alpha = parts.get(".alpha")
        scale = 1.0 if alpha is None else float(alpha.float().item()) / down.shape[0]
        out[bfl_from_kohya_stem(stem)] = (down, up, scale)
    return out


def _dm_encode(deltas: BflDeltas, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up, scale) in deltas.items():
        out[f"diffusion_model.{name}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = (up * scale).to(dtype).contiguous()
    return out


def _dm_decode(tensors: dict[str, torch.Tensor]) -> BflDeltas:
    out: BflDeltas = {}
    for stem, parts in _split_keys(tensors, (".lora_A.weight", ".lora_B.weight")).items():
        if not stem.startswith("diffusion_model."):
            raise ValueError(f"LoRA key {stem!r} does not start with 'diffusion_model.'")
        down, up = _pair(stem, parts.get(".lora_A.weight"), parts.get(".lora_B.weight"))
        out[stem[len("diffusion_model.") :]] = (down, up, 1.0)
    return out


@dataclass(frozen=True)
class LoraFormat:
    """A file layout: ``encode`` BflDeltas → named tensors, ``decode`` the reverse."""

    name: str
    help: str
    encode: Callable[[BflDeltas, torch.dtype], dict[str, torch.Tensor]]
    decode: Callable[[dict[str, torch.Tensor]], BflDeltas]

    def to_tensors(
        self, network: LoraNetwork, model: Any, dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """The network's adapter in this layout; ``model.bfl_name`` places each module.
        Plain LoRA goes through ``BflDeltas``; the other algorithms through ``records``."""
        if getattr(network, "algorithm", None) is not None and network.algorithm.name != "lora":
            from trainer_core.lora import records

            return records.encode(records.bfl_records(network, model), self.name, dtype)
        return self.encode(to_bfl(network.weights(), model.bfl_name), dtype)

    def from_tensors(self, tensors: dict[str, torch.Tensor]) -> BflDeltas:
        return self.decode(tensors)


LORA_FORMATS: Registry[LoraFormat] = Registry("LoRA format")
LORA_FORMATS.add(
    "flux1_kohya",
    LoraFormat(
        "flux1_kohya",
        "kohya lora_unet_* keys with alpha (FLUX.1, ComfyUI LoraLoader)",
        _kohya_encode,
        _kohya_decode,
    ),
)
LORA_FORMATS.add(
    "flux2_diffusion_model",
    LoraFormat(
        "flux2_diffusion_model",
        "diffusion_model.* lora_A/lora_B, scale folded into B (FLUX.2, ComfyUI LoraLoader)",
        _dm_encode,
        _dm_decode,
    ),
)
LORA_FORMATS.add(
    "zimage_diffusion_model",
    LoraFormat(
        "zimage_diffusion_model",
        "diffusion_model.* lora_A/lora_B on ComfyUI's NextDiT names, scale folded into B (Z-Image, ComfyUI LoraLoader)",
        _dm_encode,
        _dm_decode,
    ),
)


def apply_to_module(
    module: nn.Module,
    model: Any,
    tensors: dict[str, torch.Tensor],
    format_name: str,
    multiplier: float = 1.0,
) -> list[str]:
    """Merge a saved LoRA (``tensors`` in ``format_name``) into a fresh, LoRA-free
    ``module`` whose names ``model.bfl_name`` understands, with ComfyUI's rules for every
    algorithm (``records``; any key form it reads). Returns the changed modules."""
    from trainer_core.lora import records

    LORA_FORMATS.get(format_name)  # an unknown format name still fails here
    return records.merge_records(module, model.bfl_name, records.decode(tensors), multiplier)
