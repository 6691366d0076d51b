"""Cheap, stable digests of model weights: how caches and run folders tell models apart."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable


def tensor_fingerprint(items: Iterable[tuple[str, Any]], *, sample: int = 64) -> str:
    """A short hex digest of named tensors (their names, shapes, dtypes and a strided
    sample of ``sample`` values each): enough to tell base models apart, cheap on GB-size
    weights. Tensors are read as float32 on the CPU."""
    import torch

    digest = hashlib.sha256()
    with torch.inference_mode():  # reads ComfyUI's inference tensors as well as normal ones
        for name, tensor in items:
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // sample)
            values = flat[::stride][:sample].float().cpu().contiguous()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]
