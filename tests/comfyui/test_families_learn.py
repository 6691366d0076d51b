"""Every registered model family learns: a short LoRA training through the bridge lowers the
loss on a learnable toy set and moves the model's output by a measurable amount.

Parametrized over ``harness.TINY_MODELS`` (one tiny file per family/variant, built so that
ComfyUI's own model detection recognises it); a family registered in
``trainer_core.models.families`` without a tiny model fails ``test_every_family_has_a_tiny_model``.
The thresholds are ~10× below what every family reaches and far above what a broken path gives
(``test_a_broken_training_path_fails_the_check``: no gradient step leaves both at 0).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import harness
from trainer_core.config import LoRAConfig
from trainer_core.flow import interpolate, velocity_target
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.families import FAMILIES
from trainer_core.types import TextBatch

MIN_LOSS_DROP = 0.03
"""Relative loss drop (first → last of 12 steps) a short training must reach (each family: 0.10-0.18)."""
MIN_OUTPUT_CHANGE = 0.05
"""Relative change of the velocity on held-out inputs the trained LoRA must cause (each family: 1.1-1.6)."""
MIN_SENSITIVITY = 2e-4
"""Relative output change under one fixed random rank-4 perturbation of the attention layers
(FLUX.1 ~8.7e-4; the tiny FLUX.2 before ``harness.FLUX2_MOD_STD`` ~2e-5)."""


@pytest.fixture(scope="module")
def tiny_models(comfyui, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_families")
    return {name: tm.write(root / f"{name}.safetensors") for name, tm in harness.TINY_MODELS.items()}


def test_every_family_has_a_tiny_model():
    assert set(FAMILIES.names()) <= {tm.family for tm in harness.TINY_MODELS.values()}


def _inputs(model, seed: int, b: int = 2):
    """(x0, noise, sigma, text) of a 64 px image for ``model``'s family; the text is the
    family's (its encoder's width, a pooled vector only where the family takes one)."""
    g = torch.Generator().manual_seed(seed)
    fam, hw = model.family, 64 // model.family.vae_factor
    x0 = torch.randn(b, fam.latent_channels, hw, hw, generator=g)
    noise = torch.randn(b, fam.latent_channels, hw, hw, generator=g)
    sigma = torch.rand(b, generator=g) * 0.8 + 0.1
    context = torch.randn(b, 7, model.module.txt_in.weight.shape[1], generator=g)
    pooled = torch.randn(b, 32, generator=g) if fam.pooled else None
    return x0, noise, sigma, TextBatch(context, pooled)


@dataclass
class Learning:
    losses: list[float]
    output_change: float  # relative change of the velocity on held-out inputs, LoRA on vs off

    @property
    def loss_drop(self) -> float:
        return 1 - self.losses[-1] / self.losses[0]

    def learned(self) -> bool:
        return self.loss_drop >= MIN_LOSS_DROP and self.output_change >= MIN_OUTPUT_CHANGE


def learn(bridge, patcher, *, steps: int = 12, lr: float = 3e-2) -> Learning:
    """A short rank-4 LoRA training on one fixed batch (learnable: memorise it) through
    ``bridge.training_model`` and the engine's adapter; then the output change on other inputs."""
    with bridge.training_model(patcher, gradient_checkpointing=True) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=4.0), model.default_targets["all"])
        try:
            opt = torch.optim.AdamW(net.parameters(), lr=lr)
            x0, noise, sigma, text = _inputs(model, seed=0)
            x_t, target = interpolate(x0, noise, sigma), velocity_target(x0, noise)
            losses = []
            for _ in range(steps):
                loss = F.mse_loss(model.velocity(x_t, sigma, text, 1.0), target)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            x0, noise, sigma, text = _inputs(model, seed=1)
            held_out = interpolate(x0, noise, sigma)
            with torch.no_grad():
                on = model.velocity(held_out, sigma, text, 1.0)
                with net.disabled():
                    off = model.velocity(held_out, sigma, text, 1.0)
        finally:
            net.remove()
    return Learning(losses, float((on - off).norm() / off.norm()))


@pytest.mark.parametrize("name", list(harness.TINY_MODELS))
def test_short_training_lowers_the_loss_and_moves_the_output(comfyui, bridge, tiny_models, name):
    patcher = comfyui.load_flux(tiny_models[name])
    assert bridge.detect_arch(patcher).arch == harness.TINY_MODELS[name].family
    result = learn(bridge, patcher)
    assert all(torch.isfinite(torch.tensor(result.losses))), result.losses
    assert result.learned(), (f"{name}: loss {result.losses[0]:.4g} → {result.losses[-1]:.4g} "
                              f"(drop {result.loss_drop:.3g}), output change {result.output_change:.3g}")


def test_a_broken_training_path_fails_the_check(comfyui, bridge, tiny_models):
    """The check is able to fail: with no effective update (lr 0, as when no gradient reaches
    the LoRA) neither the loss nor the output moves."""
    result = learn(bridge, comfyui.load_flux(tiny_models["klein"]), lr=0.0)
    assert not result.learned() and result.output_change == 0.0


@pytest.mark.parametrize("name", list(harness.TINY_MODELS))
def test_lora_sensitivity_matches_flux1(comfyui, bridge, tiny_models, name):
    """One fixed random rank-4 perturbation of the attention layers moves every tiny model's
    output about as much as FLUX.1's (the tiny FLUX.2 used to move ~40× less)."""
    patcher = comfyui.load_flux(tiny_models[name], inference=False)
    with bridge.training_model(patcher, gradient_checkpointing=False) as model:
        x0, noise, sigma, text = _inputs(model, seed=2)
        x_t = interpolate(x0, noise, sigma)
        g = torch.Generator().manual_seed(3)
        pattern = re.compile(model.default_targets["attention"])
        with torch.no_grad():
            before = model.velocity(x_t, sigma, text, 1.0)
            saved = {}
            for n, m in model.module.named_modules():
                if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n):
                    a = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5
                    b = torch.randn(m.out_features, 4, generator=g) * 1e-2
                    saved[n] = m.weight.detach().clone()
                    m.weight += b @ a
            after = model.velocity(x_t, sigma, text, 1.0)
            for n, m in model.module.named_modules():
                if n in saved:
                    m.weight.copy_(saved[n])
    change = float((after - before).norm() / before.norm())
    assert change >= MIN_SENSITIVITY, f"{name}: relative output change {change:.3g}"
