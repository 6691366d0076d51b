"""Every algorithm's adapters in files ComfyUI loads, and back: records on BFL module names.

A *record* (``algorithms.Record``) is one module's adapter under ComfyUI's key suffixes.
``bfl_records`` groups a network's records by BFL module, fusing parts trained on row
slices of one fused weight (diffusers' to_q/to_k/to_v → FLUX.1 ``qkv``/``linear1``) where
the algorithm can do so exactly (LoRA, DoRA, LoHa) and refusing otherwise (LoKr).

Key layouts (``encode``):
- ``flux1_kohya``: ``lora_unet_<bfl name, . → _>.<suffix>``, alpha kept (kohya / LyCORIS).
- ``flux2_diffusion_model`` (and ``zimage_diffusion_model``, on NextDiT names):
  ``diffusion_model.<bfl name>.<suffix>``; LoRA/DoRA pairs are
  ``lora_A.weight``/``lora_B.weight`` with the scale folded into B and no alpha.

``decode`` reads those plus the diffusers/peft ``transformer.<diffusers name>`` form (FLUX.1
split names, fused here) and returns BFL name → record; ``merge_records`` applies records to
a module with ComfyUI's rules (``algorithms.patched_weight``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer_core.lora.algorithms import ALGORITHMS
from trainer_core.lora.patch_rules import (DOWN, UP, Record, fill_untrained, patched_weight, record_algorithm,
                                           record_scale)
from trainer_core.lora.bfl_names import diffusers_flux1_to_bfl
from trainer_core.types import BflSlot

BflNamer = Callable[[str], BflSlot | None]

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale",
            ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2",
            ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
_RENAME = {"lora_A.weight": DOWN, "lora_B.weight": UP}


def _base_rows(module: nn.Module, namer: BflNamer, name: str, sizes: tuple[int, ...]) -> torch.Tensor:
    """The fused BFL weight ``name`` rebuilt from ``module``'s split Linear layers."""
    rows: dict[int, torch.Tensor] = {}
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear) or hasattr(m, "get_base_layer"):
            slot = namer(n)
            if slot is not None and slot.name == name and slot.fused:
                base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
                rows[slot.part] = base.weight.detach().float()
    if len(rows) != len(sizes):
        raise ValueError(f"cannot rebuild the fused weight {name!r} from the model's layers")
    return torch.cat([rows[i] for i in range(len(sizes))])


def bfl_records(network: Any, model: Any) -> dict[str, Record]:
    """BFL module name → record for every trained module of ``network`` (see module doc)."""
    algorithm = network.algorithm
    groups: dict[str, list[tuple[BflSlot, str, Record]]] = {}
    for module_name, rec in network.records().items():
        slot = model.bfl_name(module_name)
        if slot is None:
            raise ValueError(f"trained module {module_name!r} has no BFL (ComfyUI) counterpart, so it cannot be saved "
                             "in a ComfyUI LoRA file; exclude it from lora.target_regex")
        groups.setdefault(slot.name, []).append((slot, module_name, rec))
    out: dict[str, Record] = {}
    for name, parts in groups.items():
        if not parts[0][0].fused:
            if len(parts) > 1:
                raise ValueError(f"modules {[p[1] for p in parts]} all map to the unfused BFL module {name!r}")
            out[name] = parts[0][2]
            continue
        sizes = parts[0][0].sizes
        fused = algorithm.fuse_rows(name, sorted(((s.part, r) for s, _, r in parts), key=lambda p: p[0]), sizes)
        if "dora_scale" in fused:
            fused = fill_untrained(fused, _base_rows(model.module, model.bfl_name, name, sizes))
        out[name] = fused
    return out


def fused_split_refusal(algorithm: str, module_names: list[str], namer: BflNamer) -> str:
    """Why ``algorithm`` cannot train these modules for a ComfyUI file ("" when it can)."""
    if algorithm != "lokr":
        return ""
    split = [n for n in module_names if (slot := namer(n)) is not None and slot.fused]
    if not split:
        return ""
    return (f"lora.algorithm='lokr' cannot be saved for ComfyUI from layers that are row slices of one fused "
            f"FLUX weight ({', '.join(split[:4])}{', ...' if len(split) > 4 else ''}): a Kronecker product per "
            "slice is not one Kronecker product of the fused qkv/linear1. Train on ComfyUI's FLUX model (its "
            "qkv/linear1 are trained whole), use algorithm 'lora'/'dora'/'loha', or set targets='custom' with a "
            "lora.target_regex without to_q/to_k/to_v/add_*_proj/proj_mlp")


# ---------------------------------------------------------------------- layouts
def kohya_stem(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def encode(records: dict[str, Record], layout: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Records → named tensors in ``layout`` (``flux1_kohya`` or ``flux2_diffusion_model``)."""
    out = {}
    for name, rec in records.items():
        rec = dict(rec)
        if layout == "flux1_kohya":
            prefix = kohya_stem(name)
        elif layout in ("flux2_diffusion_model", "zimage_diffusion_model"):
            prefix = f"diffusion_model.{name}"
            if DOWN in rec:  # lora_A/lora_B, scale folded into B, no alpha (as ai-toolkit writes)
                scale = record_scale(rec)
                rec = {"lora_A.weight": rec.pop(DOWN), "lora_B.weight": rec.pop(UP) * scale,
                       **{k: v for k, v in rec.items() if k != "alpha"}}
        else:
            raise ValueError(f"unknown LoRA layout {layout!r}")
        for suffix, t in rec.items():
            out[f"{prefix}.{suffix}"] = t.float().reshape(()) if suffix == "alpha" else t.to(dtype).contiguous()
    return out


def _stem_to_bfl(stem: str) -> tuple[str, str | None]:
    """(BFL name, None) or (diffusers name, 'transformer') for a key stem."""
    from trainer_core.lora.formats import bfl_from_kohya_stem

    if stem.startswith("lora_unet_"):
        return bfl_from_kohya_stem(stem), None
    if stem.startswith("diffusion_model."):
        return stem[len("diffusion_model."):], None
    if stem.startswith("transformer."):
        return stem[len("transformer."):], "transformer"
    raise ValueError(f"LoRA key stem {stem!r} is in no form FlowTrain reads (lora_unet_*, diffusion_model.*, "
                     "transformer.*)")


def split_records(tensors: dict[str, torch.Tensor]) -> dict[str, Record]:
    """Key stem → record (suffixes normalised to ComfyUI's kohya names)."""
    out: dict[str, Record] = {}
    for k, v in tensors.items():
        suffix = next((s for s in SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"LoRA key {k!r} ends in none of {list(SUFFIXES)}")
        s = suffix[1:]
        out.setdefault(k[: -len(suffix)], {})[_RENAME.get(s, s)] = v.float()
    return out


def key_form(tensors: dict[str, torch.Tensor]) -> str:
    """'kohya', 'diffusion_model' or 'transformer' (the key form of a file's stems)."""
    forms = {_stem_to_bfl(stem)[1] or stem.split("_")[0].split(".")[0] for stem in split_records(tensors)}
    names = {"lora": "kohya", "diffusion": "diffusion_model", "transformer": "transformer"}
    found = {names.get(f, f) for f in forms}
    if len(found) != 1:
        raise ValueError(f"LoRA file mixes key forms {sorted(found)}")
    return found.pop()


def decode(tensors: dict[str, torch.Tensor]) -> dict[str, Record]:
    """Named tensors (any form ``_stem_to_bfl`` reads) → BFL name → record. Split FLUX.1
    diffusers parts (``transformer.…attn.to_q`` …) are fused with their algorithm; FLUX.1's
    MLP width is 4·D, D read from a q/k/v/out part's rows."""
    out: dict[str, Record] = {}
    diffusers: dict[str, Record] = {}
    for stem, rec in split_records(tensors).items():
        name, form = _stem_to_bfl(stem)
        record_algorithm(rec)  # raises for a stem without adapter tensors
        (diffusers if form else out)[name] = rec
    if not diffusers:
        return out
    dims = [_out_rows(r) for n, r in diffusers.items()
            if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
            or n.endswith(("to_out.0", "to_add_out"))]
    if not dims:
        raise ValueError("a transformer.* LoRA without any attention layer: its model width is unknown")
    d = dims[0]
    split: dict[str, list[tuple[BflSlot, Record]]] = {}
    for name, rec in diffusers.items():
        slot = diffusers_flux1_to_bfl(name, d, 4 * d)
        if slot is None:
            raise ValueError(f"LoRA key transformer.{name} names no FLUX.1 module FlowTrain maps to ComfyUI's layout")
        if slot.fused:
            split.setdefault(slot.name, []).append((slot, rec))
        else:
            out[slot.name] = rec
    for name, parts in split.items():
        algo = ALGORITHMS.get(record_algorithm(parts[0][1]))
        # DoRA rows of untrained parts stay NaN: ``patched_weight``/``load`` leave them unchanged
        out[name] = algo.fuse_rows(name, sorted(((p.part, r) for p, r in parts), key=lambda t: t[0]),
                                   parts[0][0].sizes)
    return out


def _out_rows(rec: Record) -> int:
    if UP in rec:
        return int(rec[UP].shape[0])
    if "hada_w1_a" in rec:
        return int(rec["hada_w1_a"].shape[0])
    w1 = rec["lokr_w1"] if "lokr_w1" in rec else rec["lokr_w1_a"]
    w2 = rec["lokr_w2"] if "lokr_w2" in rec else rec["lokr_w2_a"]
    return int(w1.shape[0] * w2.shape[0])


# ---------------------------------------------------------------------- merge
def module_records(module: nn.Module, namer: BflNamer, records: dict[str, Record]) -> dict[str, Record]:
    """BFL records → records for ``module``'s own Linear layers (fused records sliced into
    the split layers' rows). Every record must land somewhere, else ValueError."""
    used, out = set(), {}
    for n, m in module.named_modules():
        wrapped = hasattr(m, "get_base_layer") and m.get_base_layer() is not m  # a peft layer: use its base
        if not (isinstance(m, nn.Linear) or wrapped) or n.endswith(".base_layer"):
            continue
        if wrapped:
            m = m.get_base_layer()
        slot = namer(n)
        if slot is None or slot.name not in records:
            continue
        rec = records[slot.name]
        if slot.fused:
            rows = _out_rows(rec)
            if rows != sum(slot.sizes):
                raise ValueError(f"LoRA for {slot.name!r} has {rows} rows; the model's has {sum(slot.sizes)}")
            start = sum(slot.sizes[: slot.part])
            rec = ALGORITHMS.get(record_algorithm(rec)).slice_rows(rec, start, slot.sizes[slot.part])
            if _untrained(rec, m.weight):
                used.add(slot.name)
                continue  # a part the fused adapter leaves alone (zero rows): not a trained layer here
        out[n] = rec
        used.add(slot.name)
    unused = sorted(set(records) - used)
    if unused:
        raise ValueError(f"LoRA modules {unused[:8]} have no counterpart in this model (is the file for another model?)")
    return out


def _untrained(rec: Record, weight: torch.Tensor) -> bool:
    """A row slice whose patch leaves the weight as it is (a fused part nobody trained):
    zero ΔW rows, and for DoRA a dora_scale that is NaN or ‖W‖ there."""
    ds = rec.get("dora_scale")
    if ds is not None:
        norms = weight.detach().float().norm(dim=1, keepdim=True)
        ds = ds.float().reshape(-1, 1)
        if not (torch.isnan(ds) | torch.isclose(ds, norms, rtol=1e-6, atol=0)).all():
            return False
    if UP in rec:
        return not rec[UP].any()
    if "hada_w1_a" in rec:
        return not rec["hada_w1_a"].any() or not rec["hada_w2_a"].any()
    return False


def merge_records(module: nn.Module, namer: BflNamer, records: dict[str, Record], multiplier: float = 1.0) -> list[str]:
    """Patch ``module``'s Linear weights in place as ComfyUI's LoraLoader would; returns the
    changed module names."""
    per_module = module_records(module, namer, records)
    with torch.no_grad():
        for n, rec in per_module.items():
            m = module.get_submodule(n)
            try:
                new = patched_weight(m.weight, rec, multiplier)
            except ValueError as e:
                raise ValueError(f"{n}: {e}") from None
            m.weight.copy_(new.to(m.weight.dtype))
    return list(per_module)
