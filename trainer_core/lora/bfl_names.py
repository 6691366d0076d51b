"""Where a trained submodule lands in the BFL (ComfyUI) FLUX layout.

LoRA files for ComfyUI name BFL modules (``double_blocks.0.img_attn.qkv``), while diffusers'
FLUX.1 transformer splits some of them: ``to_q``/``to_k``/``to_v`` are row slices of the BFL
``qkv`` weight, and a single block's ``to_q``/``to_k``/``to_v``/``proj_mlp`` are row slices of
``linear1``. A ``BflSlot`` records the BFL module plus the slice.

Source of the correspondence: diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``), cross-checked with ComfyUI's
``comfy.utils.flux_to_diffusers``:

=========================================  ==========================================
diffusers                                  BFL
=========================================  ==========================================
transformer_blocks.i.attn.to_q|k|v          double_blocks.i.img_attn.qkv rows [0,D) [D,2D) [2D,3D)
transformer_blocks.i.attn.add_q|k|v_proj    double_blocks.i.txt_attn.qkv (same slices)
transformer_blocks.i.attn.to_out.0          double_blocks.i.img_attn.proj
transformer_blocks.i.attn.to_add_out        double_blocks.i.txt_attn.proj
transformer_blocks.i.ff.net.0.proj / net.2  double_blocks.i.img_mlp.0 / img_mlp.2
transformer_blocks.i.ff_context.net.…       double_blocks.i.txt_mlp.0 / txt_mlp.2
transformer_blocks.i.norm1(_context).linear double_blocks.i.img_mod.lin / txt_mod.lin
single_transformer_blocks.i.attn.to_q|k|v   single_blocks.i.linear1 rows [0,D) [D,2D) [2D,3D)
single_transformer_blocks.i.proj_mlp        single_blocks.i.linear1 rows [3D, 3D+mlp)
single_transformer_blocks.i.proj_out        single_blocks.i.linear2
single_transformer_blocks.i.norm.linear     single_blocks.i.modulation.lin
x_embedder / context_embedder               img_in / txt_in
time_text_embed.timestep_embedder.linear_1|2  time_in.in_layer / out_layer
time_text_embed.text_embedder.linear_1|2      vector_in.in_layer / out_layer
time_text_embed.guidance_embedder.linear_1|2  guidance_in.in_layer / out_layer
proj_out                                    final_layer.linear
norm_out.linear                             None: BFL's final_layer.adaLN_modulation.1 stores
                                            (shift, scale) rows, diffusers (scale, shift); not a
                                            row-preserving copy, so never targeted or saved.
=========================================  ==========================================
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from trainer_core.types import BflSlot

_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")

_DOUBLE_PLAIN = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_DOUBLE_QKV = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_LINEAR1 = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}


def diffusers_flux1_to_bfl(module_name: str, inner_dim: int, mlp_hidden_dim: int) -> BflSlot | None:
    """BFL slot of a diffusers ``FluxTransformer2DModel`` Linear, or None without an exact
    row-preserving BFL counterpart (``norm_out.linear``, anything unknown).

    ``inner_dim`` D = heads · head_dim; ``mlp_hidden_dim`` = 4·D for FLUX.1.
    """
    m = _SINGLE.fullmatch(module_name)
    if m:
        i, rest = m.groups()
        if rest in _SINGLE_LINEAR1:
            sizes = (inner_dim, inner_dim, inner_dim, mlp_hidden_dim)
            return BflSlot(f"single_blocks.{i}.linear1", _SINGLE_LINEAR1[rest], sizes)
        if rest in _SINGLE_PLAIN:
            return BflSlot(f"single_blocks.{i}.{_SINGLE_PLAIN[rest]}")
        return None
    m = _DOUBLE.fullmatch(module_name)
    if m:
        i, rest = m.groups()
        if rest in _DOUBLE_QKV:
            name, part = _DOUBLE_QKV[rest]
            return BflSlot(f"double_blocks.{i}.{name}", part, (inner_dim,) * 3)
        if rest in _DOUBLE_PLAIN:
            return BflSlot(f"double_blocks.{i}.{_DOUBLE_PLAIN[rest]}")
        return None
    if module_name in _TOP:
        return BflSlot(_TOP[module_name])
    return None


def diffusers_flux1_namer(module: nn.Module) -> Callable[[str], BflSlot | None]:
    """``bfl_name`` for a diffusers ``FluxTransformer2DModel``: reads D and the MLP width
    from the module itself (``inner_dim``, ``single_transformer_blocks[0].mlp_hidden_dim``)."""
    inner_dim = int(module.inner_dim)
    singles = getattr(module, "single_transformer_blocks", None)
    mlp_hidden = int(singles[0].mlp_hidden_dim) if singles is not None and len(singles) else 4 * inner_dim
    return lambda name: diffusers_flux1_to_bfl(name, inner_dim, mlp_hidden)


def bfl_identity(module_name: str) -> BflSlot | None:
    """``bfl_name`` for ComfyUI's own FLUX.1/FLUX.2 module (``comfy.ldm.flux.model.Flux``):
    its submodule names already are the BFL names."""
    return BflSlot(module_name)


_D_ATTN = r"transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_S_ATTN = r"single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_out)"
_D_MLP = r"transformer_blocks\.\d+\.(?:ff|ff_context)\.net\.(?:0\.proj|2)"
_S_MLP = r"single_transformer_blocks\.\d+\.proj_mlp"

_B_ATTN = r"double_blocks\.\d+\.(?:img_attn|txt_attn)\.(?:qkv|proj)"
_B_S_ATTN = r"single_blocks\.\d+\.(?:linear1|linear2)"
_B_MLP = r"double_blocks\.\d+\.(?:img_mlp|txt_mlp)\.(?:0|2)"


def flux_target_presets() -> dict[str, str]:
    """Target regexes (``re.fullmatch`` on module names) for diffusers' FLUX.1 transformer.

    ``attention``: double-block q/k/v/out for image and text, single-block q/k/v and
    ``proj_out``. A single block's attention output is only projected through ``proj_out``
    (= BFL ``linear2``), which also carries the MLP output; it is included so the attention
    path is trained end to end. ``all``: attention + double-block MLPs (``ff``/``ff_context``
    ``net.0.proj``/``net.2``) + single-block ``proj_mlp``. Neither targets modulation layers or
    embedders (ai-toolkit and musubi leave them alone).
    """
    attention = f"(?:{_D_ATTN}|{_S_ATTN})"
    return {"attention": attention, "all": f"(?:{_D_ATTN}|{_S_ATTN}|{_D_MLP}|{_S_MLP})"}


def bfl_target_presets() -> dict[str, str]:
    """The same presets on BFL names (ComfyUI's FLUX.1 and FLUX.2 module).

    Here q/k/v and the single-block MLP input are one fused ``linear1``, so ``attention``
    necessarily trains the whole ``linear1`` (including its MLP rows), unlike the diffusers
    preset which trains only its q/k/v slices.
    """
    return {
        "attention": f"(?:{_B_ATTN}|{_B_S_ATTN})",
        "all": f"(?:{_B_ATTN}|{_B_S_ATTN}|{_B_MLP})",
    }
