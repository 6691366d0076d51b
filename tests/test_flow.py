"""Sigma schemes, shifts, interpolation and weighting against their formulas."""
import math

import pytest
import torch

from trainer_core.flow import (
    SIGMA_SCHEMES, SigmaParams, WEIGHTINGS, flux_mu, flux_shift_sigmas, interpolate, predicted_x0,
    sample_sigmas, shift_sigmas, step_generator, velocity_target,
)

N = 20000


def draw(scheme, seed=0, step=0, **params):
    return sample_sigmas(N, scheme=scheme, generator=step_generator(seed, step), params=SigmaParams(**params))


@pytest.mark.parametrize("scheme", SIGMA_SCHEMES.names())
def test_every_scheme_stays_inside_open_interval(scheme):
    s = draw(scheme)
    assert s.dtype == torch.float32 and s.shape == (N,)
    assert float(s.min()) > 0 and float(s.max()) < 1


@pytest.mark.parametrize("scheme", SIGMA_SCHEMES.names())
def test_same_seed_and_step_give_same_draws_and_others_differ(scheme):
    assert torch.equal(draw(scheme, 3, 7), draw(scheme, 3, 7))
    assert not torch.equal(draw(scheme, 3, 7), draw(scheme, 3, 8))
    assert not torch.equal(draw(scheme, 3, 7), draw(scheme, 4, 7))


def test_uniform_moments():
    s = draw("uniform").double()
    assert abs(s.mean() - 0.5) < 0.01 and abs(s.var() - 1 / 12) < 0.005


def test_sigmoid_is_logit_normal_with_configured_mean_and_std():
    s = draw("sigmoid", sigmoid_mean=0.5, sigmoid_std=0.8).double()
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03


def test_shift_scheme_matches_quantiles_of_shifted_uniform():
    s = draw("shift", shift=3.0).double()
    for q in (0.1, 0.5, 0.9):
        expected = 3 * q / (1 + 2 * q)  # the shift of the uniform quantile (monotone map)
        assert abs(torch.quantile(s, q) - expected) < 0.01


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 3.1582, 10.0])
def test_shift_maps_ends_to_ends_and_is_monotone(shift):
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    out = shift_sigmas(grid, shift)
    assert out[0] == 0 and abs(out[-1] - 1) < 1e-12
    assert torch.all(out[1:] > out[:-1])


def test_flux_shift_mu_endpoints_and_map():
    assert math.isclose(flux_mu(256), 0.5) and math.isclose(flux_mu(4096), 1.15)
    assert math.isclose(flux_mu(2176), 0.825)
    grid = torch.linspace(1e-6, 1, 1001, dtype=torch.float64)
    out = flux_shift_sigmas(grid, 1.15)
    assert torch.all(out[1:] > out[:-1]) and abs(out[-1] - 1) < 1e-12 and out[0] < 1e-5
    # σ' = e^μ/(e^μ + 1/σ - 1) equals the shift with s = e^μ
    assert torch.allclose(out, shift_sigmas(grid, math.exp(1.15)))


def test_flux_shift_scheme_moves_mass_to_high_noise_for_more_tokens():
    small, large = draw("flux_shift", image_tokens=256), draw("flux_shift", image_tokens=4096)
    assert large.mean() > small.mean() + 0.05


def test_content_favours_high_noise_and_style_low_noise():
    content, style = draw("content").double(), draw("style").double()
    # σ = 1 - u³: P(σ > 0.5) = P(u³ < 0.5) = 0.5^(1/3) ≈ 0.794
    assert abs((content > 0.5).double().mean() - 0.5 ** (1 / 3)) < 0.01
    assert abs((style < 0.5).double().mean() - 0.5 ** (1 / 3)) < 0.01
    assert abs(content.mean() - 0.75) < 0.01 and abs(style.mean() - 0.25) < 0.01


def test_balanced_is_an_even_mixture_of_content_and_style():
    s = draw("balanced").double()
    assert abs(s.mean() - 0.5) < 0.01
    # mixture density piles up at both ends: P(σ<0.1) = ½·0.1^(1/3) + ½·(1-0.9^(1/3))
    expected = 0.5 * 0.1 ** (1 / 3) + 0.5 * (1 - 0.9 ** (1 / 3))
    assert abs((s < 0.1).double().mean() - expected) < 0.01


def test_unknown_scheme_lists_choices():
    with pytest.raises(ValueError, match="choose one of: uniform, sigmoid"):
        sample_sigmas(1, scheme="karras", generator=step_generator(0, 0))


def test_interpolation_and_target():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.5 * x0[1] + 0.5 * noise[1])
    v = velocity_target(x0, noise)
    # x_t moves along v: d/dσ x_t = ε - x0; and x0 is recovered from (x_t, v)
    assert torch.allclose(predicted_x0(xt, v, sigma), x0, atol=1e-6)


def test_bell_weighting_has_mean_one_and_peaks_mid():
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    w = WEIGHTINGS.get("bell_shaped")(grid)
    assert abs(w.mean() - 1) < 1e-4
    assert w[50000] == w.max()
    assert math.isclose(float(w[0] / w[50000]), math.exp(-0.5), rel_tol=1e-9)  # exp(-2·½²)
    assert torch.equal(WEIGHTINGS.get("none")(grid), torch.ones_like(grid))
