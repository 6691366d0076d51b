"""The training RoPE (``trainer_core.models.rope``): same forward as the plain rotation,
and a hand-written backward (the transposed rotation) that matches autograd's."""
from __future__ import annotations

import torch

from trainer_core.models.rope import apply_rope, rotate


def _freqs(tokens: int, pairs: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A FLUX-layout table [1, 1, T, D/2, 2, 2] of rotations [[cos, -sin], [sin, cos]]."""
    angle = torch.rand(1, 1, tokens, pairs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6.3
    table = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1)
    return table.reshape(1, 1, tokens, pairs, 2, 2).to(dtype)


def test_backward_is_the_gradient_of_the_rotation():
    """gradcheck in float64 (numerical vs analytic Jacobian), also with a general (not
    orthogonal) 2×2 table, so a transpose mistake cannot hide behind R⁻¹ = Rᵀ."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    general = torch.randn(1, 1, 5, 4, 2, 2, dtype=torch.float64, generator=g)
    for freqs in (_freqs(5, 4, torch.float64), general):
        assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, freqs), (q, k))


def test_matches_autograd_through_the_plain_rotation_in_bf16():
    """bf16 q/k with an fp32 table (FLUX training): forward bitwise equal, gradients equal
    up to bf16 rounding of the same fp32 sums; a longer table is cut to the tokens."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 7, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(1, 3, 7, 16, generator=g).bfloat16().requires_grad_()
    grads = (torch.randn(1, 3, 7, 16, generator=g).bfloat16(), torch.randn(1, 3, 7, 16, generator=g).bfloat16())
    freqs = _freqs(9, 8)
    ours = apply_rope(q, k, freqs)
    ours_grad = torch.autograd.grad(ours, (q, k), grads)
    plain = (rotate(q, freqs), rotate(k, freqs))
    plain_grad = torch.autograd.grad(plain, (q, k), grads)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(ours, plain))
    for a, b in zip(ours_grad, plain_grad):
        assert a.dtype == torch.bfloat16 and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
        assert not torch.equal(a, torch.zeros_like(a))
