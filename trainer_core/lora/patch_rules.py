"""How ComfyUI's LoraLoader patches a weight with one module's adapter (a *record*).

Rules read from ComfyUI's comfy/weight_adapter/*.py (facts only): LoRA ΔW = up·down·alpha/rank
(1 without alpha); LoHa ΔW = (w1a·w1b)⊙(w2a·w2b)·alpha/w1b.rows; LoKr ΔW = kron(w1, w2)·alpha/rank
when a factor is a low-rank product (rank of w2's, else w1's), else ·1 (alpha ignored); with
``dora_scale`` [out, 1]: W' = (W + ΔW)·dora_scale/(‖W‖_row + eps), the row norms of the ORIGINAL
W (DoRA itself divides by those of W + ΔW); strength s ≠ 1 gives W + s·(W' - W).
"""
from __future__ import annotations

import math

import torch

Record = dict[str, torch.Tensor]
"""One module's adapter under ComfyUI's key suffixes, fp32 (``alpha`` a 0-d tensor)."""

DOWN, UP = "lora_down.weight", "lora_up.weight"
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.norm(dim=1, keepdim=True)


def record_algorithm(record: Record) -> str:
    """Which algorithm a record is, from its keys (as ComfyUI's loader decides)."""
    if "hada_w1_a" in record:
        return "loha"
    if any(k in record for k in LOKR):
        return "lokr"
    if DOWN in record:
        return "dora" if "dora_scale" in record else "lora"
    raise ValueError(f"no adapter tensors among {sorted(record)}")


def record_scale(record: Record) -> float:
    """The factor ComfyUI multiplies the record's product by."""
    alpha = record.get("alpha")
    algo = record_algorithm(record)
    if alpha is None:
        return 1.0
    alpha = float(alpha)
    if algo in ("lora", "dora"):
        return alpha / record[DOWN].shape[0]
    if algo == "loha":
        return alpha / record["hada_w1_b"].shape[0]
    if "lokr_w2_b" in record:
        return alpha / record["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in record:
        return alpha / record["lokr_w1_b"].shape[0]
    return 1.0


def delta_weight(record: Record, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW [out, in] fp32 of a record, scale included (no DoRA normalisation)."""
    algo = record_algorithm(record)
    if algo in ("lora", "dora"):
        d = record[UP].float() @ record[DOWN].float()
    elif algo == "loha":
        d = (record["hada_w1_a"].float() @ record["hada_w1_b"].float()) * (
            record["hada_w2_a"].float() @ record["hada_w2_b"].float())
    else:
        w1 = record["lokr_w1"].float() if "lokr_w1" in record else record["lokr_w1_a"].float() @ record["lokr_w1_b"].float()
        w2 = record["lokr_w2"].float() if "lokr_w2" in record else record["lokr_w2_a"].float() @ record["lokr_w2_b"].float()
        d = torch.kron(w1, w2)
    if d.numel() != math.prod(shape):
        raise ValueError(f"a {algo} adapter gives {tuple(d.shape)} but the weight is {tuple(shape)}: the file was "
                         "trained for a different model size")
    return d.reshape(shape) * record_scale(record)


def patched_weight(weight: torch.Tensor, record: Record, multiplier: float = 1.0) -> torch.Tensor:
    """W' (fp32) = what ComfyUI's LoraLoader makes of ``weight`` with ``record`` at strength
    ``multiplier`` (DoRA: W + m·((W+ΔW)·s/‖W‖ - W), ComfyUI's interpolation)."""
    w = weight.float()
    d = delta_weight(record, tuple(w.shape))
    ds = record.get("dora_scale")
    if ds is None:
        return w + multiplier * d
    ds = fill_untrained(record, w)["dora_scale"].float()
    if ds.shape[0] != w.shape[0]:
        raise ValueError(f"dora_scale {tuple(ds.shape)} is not per output row of a {tuple(w.shape)} weight; "
                         "only output-axis DoRA (LyCORIS wd_on_output) is read")
    new = (w + d) * (ds.reshape(-1, 1) / (_row_norm(w) + torch.finfo(torch.float32).eps))
    return w + multiplier * (new - w)


def fill_untrained(record: Record, weight: torch.Tensor) -> Record:
    """A fused DoRA record's rows that no part trained get dora_scale = ‖W‖ (left unchanged)."""
    ds = record.get("dora_scale")
    if ds is None or not torch.isnan(ds).any():
        return record
    norms = _row_norm(weight.float())
    return {**record, "dora_scale": torch.where(torch.isnan(ds), norms, ds)}
