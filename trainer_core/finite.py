"""Cheap checks that tensors hold only finite numbers.

``all_finite`` costs one fused L2-norm reduction per (device, dtype) group
(``torch._foreach_norm``, the kernel gradient clipping uses; NaN and inf propagate) and a
single host sync, so it can run after every optimizer step. A finite value above ~1e19
overflows its squared norm and counts as non-finite too: such a weight is a blown-up run
in any case. (The max-abs norm, ord=inf, cannot overflow but is ~7x slower on CPU.)
``nonfinite_names`` is the slow, per-tensor path used only to word an error.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def _float_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every floating-point tensor in ``obj`` (tensors, lists, tuples and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj.detach()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v)


def all_finite(*objs: Any) -> bool:
    """True when every floating-point tensor in ``objs`` is free of NaN and inf."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for obj in objs:
        for t in _float_tensors(obj):
            if t.numel():
                groups.setdefault((t.device, t.dtype), []).append(t)
    if not groups:
        return True
    flags = []
    for tensors in groups.values():
        norms = torch._foreach_norm(tensors, 2)
        flags.append(torch.stack(norms).isfinite().all())
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())  # the one host sync


def nonfinite_names(named: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Names (keys of ``named``) whose tensors hold NaN or inf, at most ``limit``."""
    bad = []
    for name, obj in named.items():
        if not all_finite(obj):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad
