"""Small facts about a module that every model adapter needs."""
from __future__ import annotations

import torch
from torch import nn


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU if none)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


COMPILE_SETTINGS = ("auto", "on", "off")


def resolve_compile(setting: str, device: torch.device) -> bool:
    """Whether ``train.compile`` compiles the transformer blocks on ``device``: "on"/"off" as
    said; "auto" only on a CUDA device with a working Triton (where compiled blocks are
    faster); on a CPU compiling costs minutes and gains little."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"train.compile={setting!r}; expected one of {list(COMPILE_SETTINGS)}")
    if setting != "auto":
        return setting == "on"
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
