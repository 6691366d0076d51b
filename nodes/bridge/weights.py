"""ComfyUI's weights made usable by autograd, in place, and put back exactly as they were.

Weights made inside a prompt are inference tensors; ``AutogradSafeWeights`` swaps them for
normal tensors one at a time and restores the original objects afterwards. ComfyUI's
quantized weights (``QuantizedTensor``, a wrapper subclass) are handled through their inner
tensors, so they stay quantized.
"""
from __future__ import annotations

from typing import Optional

import torch


def _autograd_unsafe(t: torch.Tensor) -> bool:
    """An inference tensor, or an object created as one (after ``.data = ...`` it no longer
    reports ``is_inference()`` but still has no version counter)."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


class AutogradSafeWeights:
    """Swap ``module``'s inference-tensor parameters and buffers for normal tensors, and back.

    Weights made inside a prompt are inference tensors; autograd can neither save them for
    backward nor give them a version counter, and ``p.data = ...`` does not change that
    (the Parameter object itself is the inference tensor). ``apply`` therefore puts a new
    Parameter (``requires_grad=False``) holding a normal copy in each slot and empties the
    original's storage right away, one tensor at a time: the extra memory at any moment is
    one tensor, never the model. ``restore`` copies the values back into the ORIGINAL
    objects as inference tensors (again one tensor at a time) and puts them back, so the
    MODEL keeps the same Parameter objects, values, dtypes and kind. Non-inference parameters are left in place with ``requires_grad`` False while
    applied. A tensor subclass (ComfyUI's ``QuantizedTensor``) is handled through its inner
    tensors: the copy is a new wrapper of the same kind, still quantized."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.swaps: list[tuple[torch.nn.Module, str, bool, torch.Tensor, torch.Tensor]] = []
        self.flags: list[tuple[torch.nn.Parameter, bool]] = []

    def apply(self) -> int:
        done: dict[int, torch.Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():
            for owner in self.module.modules():
                for is_param, slots in ((True, owner._parameters), (False, owner._buffers)):
                    for name, t in list(slots.items()):
                        if t is None:
                            continue
                        if not _autograd_unsafe(t):
                            if is_param and id(t) not in done:
                                self.flags.append((t, t.requires_grad))
                                t.requires_grad_(False)
                            continue
                        new = done.get(id(t))
                        if new is None:
                            copy = _normal_copy(t)
                            new = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
                            done[id(t)] = new
                        slots[name] = new
                        self.swaps.append((owner, name, is_param, t, new))
        return len(done)

    def restore(self) -> None:
        moved: set[int] = set()
        with torch.no_grad():
            for owner, name, is_param, original, new in reversed(self.swaps):
                if id(original) not in moved:
                    _copy_back(original, new)
                    moved.add(id(original))
                (owner._parameters if is_param else owner._buffers)[name] = original
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.swaps, self.flags = [], []


def _inner_tensors(t: torch.Tensor) -> Optional[list[tuple[str, torch.Tensor]]]:
    """The plain tensors inside a wrapper tensor subclass (e.g. ComfyUI's ``QuantizedTensor``:
    its fp8 data and scales), by ``__tensor_flatten__``; None for a plain tensor."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return None
    names, _ctx = t.__tensor_flatten__()
    return [(n, getattr(t, n)) for n in names]


def _normal_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (autograd-safe) copy of ``t``; the original's storage is emptied at once.
    A wrapper subclass is rebuilt around copies of its inner tensors, so a quantized weight
    stays quantized (never dequantized, one layer's packed data copied at a time)."""
    inner = _inner_tensors(t)
    if inner is None:
        copy = t.data.clone()
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return copy
    _names, ctx = t.__tensor_flatten__()
    copies = {n: v.detach().clone() for n, v in inner}
    for _n, v in inner:
        v.data = torch.empty(0, dtype=v.dtype, device=v.device)
    return type(t).__tensor_unflatten__(copies, ctx, t.shape, t.stride())


def _copy_back(original: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new``'s values back into ``original`` (or its inner tensors) as inference tensors,
    so each object is exactly the kind it was (a normal tensor set into an inference object
    lacks a version counter); ``new`` is emptied."""
    inner = _inner_tensors(original)
    pairs = [(original, new)] if inner is None else [(v, w) for (_n, v), (_m, w) in zip(inner, _inner_tensors(new))]
    for target, source in pairs:
        with torch.inference_mode():
            data = source.data.clone()
        source.data = torch.empty(0, dtype=data.dtype, device=data.device)  # one tensor extra at a time
        target.data = data


def quantized_layers(module: torch.nn.Module) -> int:
    """How many layers hold a ComfyUI quantized weight (``comfy_quant`` files: a tensor
    subclass such as ``QuantizedTensor`` with fp8/int8/fp4 storage)."""
    return sum(1 for m in module.modules() if _inner_tensors(m._parameters.get("weight")) is not None)
