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
