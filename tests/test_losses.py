"""Losses, Huber schedules, Min-SNR-γ, the wavelet term and loss-by-σ logging, each
checked against its formula written out independently here."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import pywt
import torch

from trainer_core import assemble
from trainer_core.config import TrainingConfig
from trainer_core.losses import (HUBER_SCHEDULES, LOSS_FUNCTIONS, FlowMatchingLoss, SigmaBinsCallback, WaveletLoss,
                                 dwt2, min_snr_weight)

SIGMAS = [0.001, 0.5, 0.999]


def test_elementwise_losses_match_their_formulas():
    pred = torch.tensor([[0.0, 1.0, -3.0]])
    target = torch.tensor([[0.5, 1.0, 1.0]])
    c = torch.tensor([0.2])
    d = [-0.5, 0.0, -4.0]
    expect = {
        "mse": [x * x for x in d],
        "l1": [abs(x) for x in d],
        "huber": [2 * 0.2 * (math.sqrt(x * x + 0.04) - 0.2) for x in d],
        "smooth_l1": [2 * (math.sqrt(x * x + 0.04) - 0.2) for x in d],
    }
    for name, values in expect.items():
        got = LOSS_FUNCTIONS.get(name)(pred, target, c)
        torch.testing.assert_close(got, torch.tensor([values]), msg=name)


def test_huber_is_mse_like_for_small_and_linear_for_large_errors():
    c, zero = torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    small = LOSS_FUNCTIONS.get("huber")(torch.tensor([[1e-3]], dtype=torch.float64), zero, c)
    large = LOSS_FUNCTIONS.get("huber")(torch.tensor([[1e3]], dtype=torch.float64), zero, c)
    assert float(small) == pytest.approx(1e-6, rel=1e-3)  # ≈ d²
    assert float(large) == pytest.approx(2e3, rel=1e-2)  # ≈ 2c|d|


def test_huber_schedules_at_both_ends_and_the_middle():
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    hc = 0.1
    torch.testing.assert_close(HUBER_SCHEDULES.get("constant")(hc, sigma), torch.full((3,), hc, dtype=torch.float64))
    torch.testing.assert_close(HUBER_SCHEDULES.get("exponential")(hc, sigma),
                               torch.tensor([hc**s for s in SIGMAS], dtype=torch.float64))
    snr = HUBER_SCHEDULES.get("snr")(hc, sigma)
    torch.testing.assert_close(snr, torch.tensor([(1 - hc) * (1 - s) ** 2 + hc for s in SIGMAS], dtype=torch.float64))
    assert snr[0] > 0.99 and snr[-1] == pytest.approx(hc, abs=1e-5)  # MSE-like at low noise, robust at high


def test_min_snr_weight_is_min_snr_gamma_times_sigma_squared():
    gamma = 5.0
    for s in SIGMAS + [1 / (1 + math.sqrt(gamma))]:
        snr = ((1 - s) / s) ** 2
        want = min(snr, gamma) * s * s
        assert float(min_snr_weight(torch.tensor([s], dtype=torch.float64), gamma)) == pytest.approx(want, rel=1e-9)


def _ctx(pred, target, sigma, x0=None, noise=None):
    x0 = torch.zeros_like(target) if x0 is None else x0
    noise = target + x0 if noise is None else noise
    s = sigma.view(-1, 1, 1, 1)
    return SimpleNamespace(predict=lambda: pred, target=target, sigma=sigma, logs={},
                           batch=SimpleNamespace(latents=x0), noise=noise, x_t=(1 - s) * x0 + s * noise)


def test_flow_loss_multiplies_weighting_and_min_snr():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor(SIGMAS)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    bell = torch.exp(-2 * (sigma - 0.5) ** 2) / (math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2)))
    w = torch.minimum((1 - sigma) ** 2, 5 * sigma**2)
    term = FlowMatchingLoss("mse", "bell_shaped", min_snr_gamma=5.0)
    ctx = _ctx(pred, target, sigma)
    torch.testing.assert_close(term(ctx), (per_sample * bell * w).mean())
    torch.testing.assert_close(ctx.logs["per_sample"], per_sample)  # logged unweighted
    plain = FlowMatchingLoss("mse", "none")(_ctx(pred, target, sigma))
    torch.testing.assert_close(plain, per_sample.mean())


def test_flow_loss_uses_the_huber_schedule():
    pred, target = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    sigma = torch.tensor(SIGMAS)
    term = FlowMatchingLoss("huber", huber_c=0.1, huber_schedule="exponential")
    c = torch.tensor([0.1**s for s in SIGMAS])
    torch.testing.assert_close(term(_ctx(pred, target, sigma)), (2 * c * (torch.sqrt(1 + c * c) - c)).mean())


@pytest.mark.parametrize("name", ["haar", "db4"])
def test_dwt2_equals_pywavelets_periodization(name):
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ll, highs = dwt2(x, name)
    for b in range(2):
        for c in range(3):
            ref_ll, (h, v, d) = pywt.dwt2(x[b, c].numpy(), name, mode="periodization")
            np.testing.assert_allclose(ll[b, c].numpy(), ref_ll, atol=1e-10)
            for k, ref in enumerate((h, v, d)):
                np.testing.assert_allclose(highs[b, c, k].numpy(), ref, atol=1e-10)


def test_wavelet_loss_compares_detail_bands_of_predicted_x0():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    sigma = torch.tensor([0.001, 0.5])
    v = noise - x0
    term = WaveletLoss(weight=2.0, wavelet="haar", levels=1)
    assert float(term(_ctx(v, v, sigma, x0, noise))) == pytest.approx(0.0, abs=1e-10)  # perfect velocity
    err = torch.randn(2, 2, 8, 8, generator=g)
    pred = (v + err).requires_grad_(True)
    got = term(_ctx(pred, v, sigma, x0, noise))
    # x̂0 - x0 = -σ·err; the haar detail bands of that, by pywt, squared, averaged, × weight.
    want = 0.0
    for b in range(2):
        for c in range(2):
            _, bands = pywt.dwt2((-float(sigma[b]) * err[b, c]).numpy(), "haar", mode="periodization")
            want += sum(float((band**2).sum()) for band in bands)
    want = 2.0 * want / (2 * 2 * 3 * 4 * 4)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_build_terms_adds_the_wavelet_term_only_when_weighted():
    base = TrainingConfig()
    assert [t.name for t in assemble.build_terms(base, None)] == ["flow"]
    cfg = TrainingConfig.from_dict({"loss": {"wavelet_loss": 0.5, "min_snr_gamma": 5.0}})
    terms = assemble.build_terms(cfg, None)
    assert [t.name for t in terms] == ["flow", "wavelet"]
    assert float(terms[0].weights(torch.tensor([0.5]))) == pytest.approx(0.25)  # min(0.25, 1.25)


def test_sigma_bins_callback_writes_means_per_bin(tmp_path):
    cb = SigmaBinsCallback(bins=10, every=2)
    state = SimpleNamespace(step=1, extra={"run_dir": tmp_path})
    cb.on_step_end(state, {"sigma": [0.05, 0.07, 0.95], "per_sample": [1.0, 3.0, 5.0]})
    assert not (tmp_path / "loss_by_sigma.json").exists()
    state.step = 2
    cb.on_step_end(state, {"sigma": [0.999, 0.5], "per_sample": [7.0, 2.0]})
    table = json.loads((tmp_path / "loss_by_sigma.json").read_text())["bins"]
    assert len(table) == 10
    assert table[0]["mean_loss"] == 2.0 and table[0]["count"] == 2
    assert table[9]["mean_loss"] == 6.0 and table[5]["mean_loss"] == 2.0 and table[3]["mean_loss"] is None
    cb.on_train_end(state, "finished")
