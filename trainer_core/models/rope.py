"""Rotary position embedding (RoPE) for training, with a backward as cheap as its forward.

FLUX (BFL layout, as in ComfyUI's ``comfy.ldm.flux.math``) rotates each pair of channels
``(x0, x1)`` of q and k by a 2×2 matrix per token and pair: ``freqs`` has shape
``[B, 1, T, D/2, 2, 2]`` (fp32) and ``out_i = Σ_j freqs[..., i, j] · x_j``
(Su et al. 2021, "RoFormer", eq. 34, in matrix form). The rotation runs in ``freqs``'s dtype
(fp32) and the result is cast back to the input's dtype, as ComfyUI's training path does.

Autograd through that forward spends most of its time in broadcast reductions (the
gradient of a ``[.., D/2, 1, 2]`` view multiplied into ``[.., D/2, 2]``) and zero-filled
select backwards. The gradient of a linear map is its transpose: ``grad_x = freqsᵀ · grad``,
so ``RotaryEmbedding.backward`` is the same rotation with the matrix transposed (half the
time of autograd's backward at FLUX's shapes on a CPU, same values up to rounding order).
"""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, T, D] rotated by ``freqs`` [B, 1, T, D/2, 2, 2]; computed in ``freqs``'s
    dtype, returned in ``x``'s. ``freqs`` longer than T (a shared table) is cut to T."""
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if pairs.shape[2] != 1 and freqs.shape[2] != 1 and pairs.shape[2] != freqs.shape[2]:
        freqs = freqs[:, :, :pairs.shape[2]]
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(*x.shape).type_as(x)


class RotaryEmbedding(torch.autograd.Function):
    """``(rotate(xq, freqs), rotate(xk, freqs))``; backward rotates the gradients by the
    transposed matrices. ``freqs`` is a constant (no gradient), as in FLUX."""

    @staticmethod
    def forward(ctx, xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor):
        ctx.save_for_backward(freqs)
        return rotate(xq, freqs), rotate(xk, freqs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k):
        (freqs,) = ctx.saved_tensors
        transposed = freqs.transpose(-1, -2)
        return (None if grad_q is None else rotate(grad_q, transposed),
                None if grad_k is None else rotate(grad_k, transposed), None)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k ([B, H, T, D] each) with ``freqs`` [B, 1, T, D/2, 2, 2]."""
    return RotaryEmbedding.apply(xq, xk, freqs)
