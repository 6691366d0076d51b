"""Text encoders in 8 bits (bitsandbytes LLM.int8) when their weights would not fit.

The text encoders only fill the caption cache and are freed before training, so an int8
copy (about half of bf16: T5-XXL 4.8 GB instead of 9.5 GB, Mistral Small 24 GB instead of 48 GB)
lets them run on a GPU the full-precision weights would overflow. Every ``nn.Linear`` becomes
a ``bitsandbytes.nn.Linear8bitLt`` (outlier threshold 6.0, as in LLM.int8()); the weights are
quantized when the module moves to its device. Embeddings and norms stay as loaded.

``--text-encoder-8bit``: ``auto`` quantizes on a CUDA device when the encoder's weights
need more than its free memory less ``MARGIN``; ``on`` always (bitsandbytes ≥ 0.45 also runs
int8 on the CPU); ``off`` never.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
MARGIN = 1.5 * 2**30  # bytes kept free for activations while encoding


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def wanted(mode: str, model: nn.Module, device: torch.device) -> bool:
    """Whether ``mode`` quantizes ``model`` for ``device`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"--text-encoder-8bit {mode!r}; expected one of {list(MODES)}")
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return weight_bytes(model) > free - MARGIN


def quantize_linears(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` for an int8 ``Linear8bitLt`` holding its weights
    (quantized on the next ``.to(device)``); returns how many were swapped."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("--text-encoder-8bit needs bitsandbytes: pip install bitsandbytes, or use "
                         "--text-encoder-8bit off") from None
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            count += 1
    return count
