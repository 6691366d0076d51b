"""Adapter algorithms (``lora.algorithm``): LoRA, DoRA, LoHa, LoKr, each on peft's layers.

An ``Algorithm`` owns everything that differs between them:

* its peft layer (``peft_config``, then ``prepare`` moves the trainable tensors to
  ``lora.dtype`` and re-initialises them there),
* its trainable tensors by stable suffix (``params``) and which of them LoRA+ speeds up
  (``loraplus_fast``; ``loraplus_refusal`` says why LoRA+ does not apply),
* its export to a *record*: the tensors of one module under the key suffixes ComfyUI reads
  (``lora_down.weight``/``lora_up.weight``/``alpha``, ``dora_scale``, ``hada_w1_a``…,
  ``lokr_w1``/``lokr_w2_a``…), such that ComfyUI's weight patch equals the trained layer,
* the reverse (``load``), used to continue from a file,
* ``fuse_rows``: several parts trained on row slices of one fused BFL weight (diffusers'
  to_q/to_k/to_v of FLUX.1's qkv) written as one exact record, or a refusal.

How ComfyUI turns a record into a weight is in ``patch_rules``; DoRA's export writes
dora_scale = m·‖W‖/‖W + ΔW‖ because ComfyUI divides by the row norms of the original W.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer_core.lora.patch_rules import DOWN, LOKR, UP, Record, fill_untrained, record_scale
from trainer_core.registry import Registry

ADAPTER = "default"


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().clone()


def base_weight(layer) -> torch.Tensor:
    """The wrapped layer's weight as fp32 (fp8/bf16 storage dequantised by ``.float()``)."""
    w = layer.get_base_layer().weight
    return w.detach().float()


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.norm(dim=1, keepdim=True)


class Algorithm:
    name = ""
    help = ""
    loraplus_refusal = ""
    network_module: str | None = None  # ss_network_module; None = kohya's plain-LoRA module of the arch

    # ----------------------------------------------------------- layer
    def peft_config(self, cfg, target_modules: str) -> Any:
        raise NotImplementedError

    def prepare(self, layer, cfg, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def params(self, layer) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def loraplus_fast(self, suffix: str) -> bool:
        return False

    # ----------------------------------------------------------- files
    def export(self, layer) -> Record:
        raise NotImplementedError

    def load(self, layer, record: Record) -> None:
        raise NotImplementedError

    def fuse_rows(self, name: str, parts: list[tuple[int, Record]], sizes: tuple[int, ...]) -> Record:
        raise ValueError(f"lora.algorithm={self.name!r} cannot write split parts of the fused module {name!r} as "
                         "one adapter exactly")

    def slice_rows(self, record: Record, start: int, rows: int) -> Record:
        raise ValueError(f"a {self.name} adapter on a fused module cannot be split into row parts exactly")

    def shape_info(self, record: Record) -> dict:
        """rank and alpha as the file says them (for continuation checks)."""
        return {}


ALGORITHMS: Registry[Algorithm] = Registry("LoRA algorithm")


# ===================================================================== LoRA / DoRA
class LoraAlgorithm(Algorithm):
    name = "lora"
    help = "low-rank update B·A (Hu et al. 2021)"
    dora = False

    def peft_config(self, cfg, target_modules):
        import peft

        # DoRA is attached in ``prepare``: peft's own DoRA init takes the weight norm in the base
        # weight's dtype, which fails for fp8 (no CPU kernel) and loses precision in bf16
        return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=target_modules, init_lora_weights=True)

    def prepare(self, layer, cfg, dtype):
        # peft casts A and B to the base weight's dtype (bf16, even fp8); move them to
        # lora.dtype and re-initialise there so the init is not quantised.
        layer.lora_A[ADAPTER].to(dtype=dtype)
        layer.lora_B[ADAPTER].to(dtype=dtype)
        layer.reset_lora_parameters(ADAPTER, True)
        if self.dora:  # peft's DoRA layer and forward; B = 0, so magnitude = ‖W‖ per row (fp32)
            from peft.tuners.lora.variants import DoraLinearVariant

            if "lora_magnitude_vector" not in layer.adapter_layer_names:
                layer.adapter_layer_names = layer.adapter_layer_names[:] + ("lora_magnitude_vector",)
            mag = _casting_dora_layer()
            w = base_weight(layer)
            mag.weight = torch.nn.Parameter(_row_norm(w).squeeze(1).to(device=w.device, dtype=dtype))
            layer.lora_magnitude_vector[ADAPTER] = mag
            layer.lora_variant[ADAPTER] = DoraLinearVariant()
            layer.use_dora[ADAPTER] = True

    def params(self, layer):
        out = [("lora_A", layer.lora_A[ADAPTER].weight), ("lora_B", layer.lora_B[ADAPTER].weight)]
        if self.dora:
            out.append(("dora_magnitude", layer.lora_magnitude_vector[ADAPTER].weight))
        return out

    def loraplus_fast(self, suffix):
        return suffix == "lora_B"

    @staticmethod
    def scale(layer) -> float:
        return float(layer.lora_alpha[ADAPTER]) / layer.r[ADAPTER]

    def export(self, layer):
        a, b = _f(layer.lora_A[ADAPTER].weight), _f(layer.lora_B[ADAPTER].weight)
        rec = {DOWN: a, UP: b, "alpha": torch.tensor(self.scale(layer) * a.shape[0])}
        if self.dora:
            w = base_weight(layer)
            m = _f(layer.lora_magnitude_vector[ADAPTER].weight).reshape(-1, 1)
            merged = w + self.scale(layer) * (b @ a)
            rec["dora_scale"] = m * _row_norm(w) / _row_norm(merged)
        return rec

    def load(self, layer, record):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        down, up = record[DOWN].float(), record[UP].float()
        if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
            raise ValueError(f"LoRA file A {tuple(down.shape)}, B {tuple(up.shape)}; the layer has A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}")
        s = record_scale(record)
        own = self.scale(layer)
        with torch.no_grad():
            a.copy_(down)
            b.copy_(up * (s / own))
            if self.dora:
                ds = record.get("dora_scale")
                if ds is None:
                    raise ValueError("the file has no dora_scale, but lora.algorithm='dora'")
                w = base_weight(layer)
                ds = fill_untrained(record, w)["dora_scale"]
                merged = w + s * (up @ down)
                m = ds.float().reshape(-1, 1) * _row_norm(merged) / _row_norm(w)
                layer.lora_magnitude_vector[ADAPTER].weight.copy_(m.reshape(-1))

    def fuse_rows(self, name, parts, sizes):
        """Concatenated down, block-diagonal up (see ``formats``); DoRA's row scales stack,
        untrained rows get ‖W‖ (ComfyUI then leaves them as they are)."""
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        scale = record_scale(parts[0][1])
        down = torch.cat([r[DOWN].float() for _, r in parts], dim=0)
        up = torch.zeros(sum(sizes), down.shape[0])
        col = 0
        for part, rec in parts:
            rank = rec[DOWN].shape[0]
            up[offsets[part]:offsets[part] + sizes[part], col:col + rank] = rec[UP].float() * (record_scale(rec) / scale)
            col += rank
        out = {DOWN: down, UP: up, "alpha": torch.tensor(scale * down.shape[0])}
        if self.dora:
            ds = torch.full((sum(sizes), 1), float("nan"))
            for part, rec in parts:
                ds[offsets[part]:offsets[part] + sizes[part]] = rec["dora_scale"].float().reshape(-1, 1)
            out["dora_scale"] = ds  # NaN rows are filled with ‖W‖ by the caller (``fill_untrained``)
        return out

    def slice_rows(self, record, start, rows):
        """The rows of one part; rank columns that are zero in them (other parts' block of a
        block-diagonal fused up) are dropped, with alpha kept in step (same scale)."""
        up = record[UP][start:start + rows]
        keep = up.any(dim=0)
        if not keep.any():
            keep = torch.ones_like(keep)
        out = {DOWN: record[DOWN][keep], UP: up[:, keep]}
        if "alpha" in record:
            out["alpha"] = torch.tensor(record_scale(record) * int(keep.sum()))
        if "dora_scale" in record:
            out["dora_scale"] = record["dora_scale"].reshape(-1, 1)[start:start + rows]
        return out

    def shape_info(self, record):
        rank = int(record[DOWN].shape[0])
        return {"rank": rank, "alpha": float(record["alpha"]) if "alpha" in record else None}


class _CastWeights:
    """A stand-in base layer for peft's DoRA maths: weight and bias in the input's dtype
    (ComfyUI's layers store fp8/bf16 and cast per forward; peft would mix dtypes)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


_DORA_LAYER: list[type] = []  # the class, built on first use (peft is imported lazily)


def _casting_dora_layer():
    if not _DORA_LAYER:
        from peft.tuners.lora.dora import DoraLinearLayer

        class CastingDoraLayer(DoraLinearLayer):
            def forward(self, x, *, base_layer, **kwargs):
                b = base_layer.bias
                cast = _CastWeights(base_layer.weight.to(x.dtype), None if b is None else b.to(x.dtype))
                return super().forward(x, base_layer=cast, **kwargs)

        _DORA_LAYER.append(CastingDoraLayer)
    return _DORA_LAYER[0](fan_in_fan_out=False)


class DoraAlgorithm(LoraAlgorithm):
    name = "dora"
    help = "LoRA with a learned magnitude per output row (Liu et al. 2024, DoRA)"
    dora = True
    network_module = "lycoris.kohya"


# ===================================================================== LoHa
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaAlgorithm(Algorithm):
    name = "loha"
    help = "Hadamard product of two low-rank pairs (FedPara / LyCORIS LoHa)"
    loraplus_refusal = ("LoRA+ sets the lr of the B side of one low-rank pair B·A; LoHa multiplies two pairs "
                        "elementwise, so there is no single B side")
    network_module = "lycoris.kohya"

    def peft_config(self, cfg, target_modules):
        import peft

        return peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=target_modules, init_weights=True)

    def prepare(self, layer, cfg, dtype):
        for k in HADA:
            getattr(layer, k)[ADAPTER].data = getattr(layer, k)[ADAPTER].data.to(dtype)
        layer.reset_adapter_parameters(ADAPTER)

    def params(self, layer):
        return [(k, getattr(layer, k)[ADAPTER]) for k in HADA]

    def export(self, layer):
        rec = {k: _f(getattr(layer, k)[ADAPTER]) for k in HADA}
        rec["alpha"] = torch.tensor(float(layer.scaling[ADAPTER]) * layer.r[ADAPTER])
        return rec

    def load(self, layer, record):
        s, own = record_scale(record), float(layer.alpha[ADAPTER]) / layer.r[ADAPTER]
        with torch.no_grad():
            for k in HADA:
                p = getattr(layer, k)[ADAPTER]
                if tuple(record[k].shape) != tuple(p.shape):
                    raise ValueError(f"LoHa {k} in the file is {tuple(record[k].shape)}; the layer's is {tuple(p.shape)}")
                p.copy_(record[k].float() * (s / own if k == "hada_w1_a" else 1.0))

    def fuse_rows(self, name, parts, sizes):
        """w1a, w2a block-diagonal (rows of part i × its rank columns), w1b, w2b stacked:
        row block i of (w1a·w1b)⊙(w2a·w2b) is part i's product exactly."""
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        scale = record_scale(parts[0][1])
        rank = sum(r["hada_w1_b"].shape[0] for _, r in parts)
        out = {"hada_w1_b": torch.cat([r["hada_w1_b"].float() for _, r in parts]),
               "hada_w2_b": torch.cat([r["hada_w2_b"].float() for _, r in parts]),
               "hada_w1_a": torch.zeros(sum(sizes), rank), "hada_w2_a": torch.zeros(sum(sizes), rank)}
        col = 0
        for part, rec in parts:
            r, rows = rec["hada_w1_b"].shape[0], slice(offsets[part], offsets[part] + sizes[part])
            out["hada_w1_a"][rows, col:col + r] = rec["hada_w1_a"].float() * (record_scale(rec) / scale)
            out["hada_w2_a"][rows, col:col + r] = rec["hada_w2_a"].float()
            col += r
        out["alpha"] = torch.tensor(scale * rank)
        return out

    def slice_rows(self, record, start, rows):
        """The rows of one part, without the rank columns that are zero in them."""
        w1a, w2a = record["hada_w1_a"][start:start + rows], record["hada_w2_a"][start:start + rows]
        keep = w1a.any(dim=0) & w2a.any(dim=0)
        if not keep.any():
            keep = torch.ones_like(keep)
        out = {"hada_w1_a": w1a[:, keep], "hada_w2_a": w2a[:, keep], "hada_w1_b": record["hada_w1_b"][keep],
               "hada_w2_b": record["hada_w2_b"][keep]}
        if "alpha" in record:
            out["alpha"] = torch.tensor(record_scale(record) * int(keep.sum()))
        return out

    def shape_info(self, record):
        return {"rank": int(record["hada_w1_b"].shape[0]),
                "alpha": float(record["alpha"]) if "alpha" in record else None}


# ===================================================================== LoKr
class LokrAlgorithm(Algorithm):
    name = "lokr"
    help = "Kronecker product of a small and a (low-rank) large factor (LyCORIS LoKr)"
    loraplus_refusal = ("LoRA+ sets the lr of the B side of one low-rank pair B·A; LoKr's Kronecker factors "
                        "have no B side")
    network_module = "lycoris.kohya"

    def peft_config(self, cfg, target_modules):
        import peft

        return peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=target_modules, init_weights=True,
                               decompose_both=cfg.lokr_decompose_both, decompose_factor=cfg.lokr_factor)

    def prepare(self, layer, cfg, dtype):
        if cfg.lokr_full_matrix and ADAPTER in layer.lokr_w2_a:
            a = layer.lokr_w2_a[ADAPTER]
            out_k, in_n = a.shape[0], layer.lokr_w2_b[ADAPTER].shape[1]
            del layer.lokr_w2_a[ADAPTER], layer.lokr_w2_b[ADAPTER]
            layer.lokr_w2[ADAPTER] = torch.nn.Parameter(torch.empty(out_k, in_n, device=a.device))
        for k in LOKR:
            d = getattr(layer, k)
            if ADAPTER in d:
                d[ADAPTER].data = d[ADAPTER].data.to(dtype)
        layer.reset_adapter_parameters(ADAPTER)

    def params(self, layer):
        return [(k, getattr(layer, k)[ADAPTER]) for k in LOKR if ADAPTER in getattr(layer, k)]

    @staticmethod
    def _decomposed(rec: Record) -> bool:
        return "lokr_w1_a" in rec or "lokr_w2_a" in rec

    def export(self, layer):
        rec = {k: _f(p) for k, p in self.params(layer)}
        scale = float(layer.scaling[ADAPTER])
        if self._decomposed(rec):
            rec["alpha"] = torch.tensor(scale * layer.r[ADAPTER])
        else:  # ComfyUI ignores alpha when both factors are full: fold the scale into w1
            rec["lokr_w1"] = rec["lokr_w1"] * scale
        return rec

    def load(self, layer, record):
        own = float(layer.alpha[ADAPTER]) / layer.r[ADAPTER]
        have = {k for k, _ in self.params(layer)}
        got = {k for k in LOKR if k in record}
        if have != got:
            raise ValueError(f"the LoKr file has factors {sorted(got)}, this network {sorted(have)} "
                             "(set lora.lokr_factor / lokr_decompose_both / lokr_full_matrix as the file was trained)")
        s = record_scale(record)
        with torch.no_grad():
            for k, p in self.params(layer):
                if tuple(record[k].shape) != tuple(p.shape):
                    raise ValueError(f"LoKr {k} in the file is {tuple(record[k].shape)}; the layer's is {tuple(p.shape)}")
                first = k in ("lokr_w1", "lokr_w1_a")
                p.copy_(record[k].float() * (s / own if first else 1.0))

    def shape_info(self, record):
        if "lokr_w2_b" in record:
            rank = int(record["lokr_w2_b"].shape[0])
        elif "lokr_w1_b" in record:
            rank = int(record["lokr_w1_b"].shape[0])
        else:
            rank = None
        return {"rank": rank, "alpha": float(record["alpha"]) if "alpha" in record and rank else None}


for _algo in (LoraAlgorithm(), DoraAlgorithm(), LohaAlgorithm(), LokrAlgorithm()):
    ALGORITHMS.add(_algo.name, _algo)
