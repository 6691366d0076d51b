"""Offset, pyramid and input-perturbation noise, and how they reach x_t and the target."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer_core import assemble
from trainer_core.config import FlowConfig, TrainingConfig
from trainer_core.flow import interpolate
from trainer_core.loop import gaussian_noise, make_context
from trainer_core.noise import make_noise_fn, offset_noise, pyramid_noise


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_defaults_are_the_plain_gaussian_draw():
    x0 = torch.zeros(2, 4, 8, 8)
    fn = assemble.build_noise_fn(TrainingConfig())
    torch.testing.assert_close(fn(x0, _g()), gaussian_noise(x0, _g()))


def test_pyramid_noise_has_unit_variance_and_the_predicted_neighbour_correlation():
    d = 0.8
    n = pyramid_noise((64, 4, 32, 32), _g(1), d)
    assert float(n.var()) == pytest.approx(1.0, abs=0.03)
    # Level i repeats values over 2^i blocks: horizontally adjacent pixels share a block
    # with probability 1 - 2^-i, so corr = Σ d^{2i}(1 - 2^-i) / Σ d^{2i} (i up to side 1).
    levels = range(0, 6)  # 32 → 1 takes levels 0..5
    want = sum(d ** (2 * i) * (1 - 2.0**-i) for i in levels) / sum(d ** (2 * i) for i in levels)
    got = float((n[..., :, 1:] * n[..., :, :-1]).mean())
    assert got == pytest.approx(want, abs=0.03)
    assert want > 0.4  # far from white noise (0): the test can tell
    torch.testing.assert_close(pyramid_noise((2, 3, 8, 8), _g(2), 0.0), torch.randn(2, 3, 8, 8, generator=_g(2)))


def test_offset_noise_is_a_per_sample_per_channel_constant():
    flow = FlowConfig(noise_offset=0.3)
    x0 = torch.zeros(3, 4, 8, 8)
    eps = make_noise_fn(flow)(x0, _g(3))
    g = _g(3)
    base = torch.randn(x0.shape, generator=g)
    offset = eps - base
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)  # constant over h, w
    torch.testing.assert_close(offset[..., 0, 0], 0.3 * torch.randn(3, 4, generator=g))
    assert float(offset_noise((512, 4, 1, 1), _g(4), 0.3).std()) == pytest.approx(0.3, rel=0.1)


def test_input_perturbation_changes_x_t_but_not_the_target():
    cfg = TrainingConfig.from_dict({"flow": {"ip_noise_gamma": 0.5, "sigma_scheme": "uniform"}})
    x0 = torch.randn(2, 4, 8, 8, generator=_g(5))
    batch = SimpleNamespace(latents=x0)
    state = SimpleNamespace(config=cfg, data=SimpleNamespace(batch=lambda index, g, step=None: batch),
                            model=SimpleNamespace(image_tokens=lambda hw: 16), network=None)
    ctx = make_context(state, 0, 0, _g(6), assemble.build_noise_fn(cfg))
    torch.testing.assert_close(ctx.target, ctx.noise - x0)
    clean = interpolate(x0, ctx.noise, ctx.sigma)
    extra = (ctx.x_t - clean) / ctx.sigma.view(-1, 1, 1, 1)  # = γ·ξ
    assert float(extra.std()) == pytest.approx(0.5, rel=0.15)
    plain = make_context(state, 0, 0, _g(6), assemble.build_noise_fn(TrainingConfig.from_dict({"flow": {"sigma_scheme": "uniform"}})))
    torch.testing.assert_close(plain.x_t, interpolate(x0, plain.noise, plain.sigma))
