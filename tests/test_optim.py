"""Schedules (warmup, floor, restarts), optimizers by name, LoRA+ groups, schedule-free mode."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from trainer_core import assemble
from trainer_core.config import ConfigError, OptimConfig, TrainingConfig
from trainer_core.optim import OPTIMIZERS, SCHEDULES, ScheduleFreeModeCallback, build_optimizer, build_scheduler


class TinyLora:
    """Stand-in with LoraNetwork's parameter API: two layers of (lora_A [r, in], lora_B [out, r])."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.params = {}
        for layer in ("q", "k"):
            self.params[f"{layer}.lora_A"] = nn.Parameter(torch.randn(4, 8, generator=g) * 0.1)
            self.params[f"{layer}.lora_B"] = nn.Parameter(torch.randn(8, 4, generator=g) * 0.1)

    def named_parameters(self):
        return iter(self.params.items())

    def parameters(self):
        return list(self.params.values())

    def loraplus_split(self):
        return ([p for n, p in self.params.items() if not n.endswith("lora_B")],
                [p for n, p in self.params.items() if n.endswith("lora_B")])


def _lr(name, step, total=100, **kw):
    cfg = OptimConfig(schedule=name, **kw)
    return SCHEDULES.get(name)(step, total, cfg)


def test_warmup_is_linear_for_every_schedule():
    for name in SCHEDULES:
        assert _lr(name, 0, warmup_steps=9) == pytest.approx(0.1)
        assert _lr(name, 4, warmup_steps=9) == pytest.approx(0.5)


@pytest.mark.parametrize("r", [0.0, 0.2])
def test_shapes_and_floor_at_chosen_points(r):
    total, w = 110, 10  # post-warmup progress p = (step - 10) / 100
    f = lambda s: r + (1 - r) * s  # noqa: E731
    for step, p in [(10, 0.0), (60, 0.5), (110, 1.0), (85, 0.75)]:
        kw = dict(warmup_steps=w, min_lr_ratio=r)
        assert _lr("constant", step, total, **kw) == pytest.approx(1.0)
        assert _lr("linear", step, total, **kw) == pytest.approx(f(1 - p))
        assert _lr("cosine", step, total, **kw) == pytest.approx(f(0.5 * (1 + math.cos(math.pi * p))))
        assert _lr("polynomial", step, total, power=2.0, **kw) == pytest.approx(f((1 - p) ** 2))
        frac = (3 * p) % 1.0
        hard = 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * frac))
        assert _lr("cosine_with_restarts", step, total, num_cycles=3, **kw) == pytest.approx(f(hard))
    for name in SCHEDULES:
        values = [_lr(name, s, total, warmup_steps=w, min_lr_ratio=r, num_cycles=3, cycle_gamma=0.3) for s in range(w, total + 1)]
        assert min(values) >= r - 1e-12


def test_warm_restarts_lengthen_cycles_and_decay_peaks():
    # 3 cycles with mult 2 over 70 steps: lengths 10, 20, 40; peaks 1, 0.5, 0.25.
    kw = dict(num_cycles=3, cycle_mult=2.0, cycle_gamma=0.5)
    lr = lambda s: _lr("cosine_annealing_warm_restarts", s, 70, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(1.0)
    assert lr(5) == pytest.approx(0.5)  # half-way through cycle 0
    assert lr(10) == pytest.approx(0.5)  # restart at γ¹
    assert lr(20) == pytest.approx(0.5 * 0.5)  # half of cycle 1
    assert lr(30) == pytest.approx(0.25) and lr(50) == pytest.approx(0.125)
    assert lr(70) == pytest.approx(0.0, abs=1e-12)
    same = [_lr("cosine_annealing_warm_restarts", s, 90, num_cycles=3) for s in range(0, 90, 7)]
    hard = [_lr("cosine_with_restarts", s, 90, num_cycles=3) for s in range(0, 90, 7)]
    assert same == pytest.approx(hard)  # mult 1, gamma 1 = hard restarts


def test_scheduler_counts_optimizer_steps():
    net = TinyLora()
    cfg = OptimConfig(schedule="linear", lr=1.0)
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_loraplus_groups_raise_only_b():
    net = TinyLora()
    cfg = TrainingConfig.from_dict({"optim": {"loraplus_lr_ratio": 16.0, "lr": 1e-3, "weight_decay": 0.01}})
    assert assemble.param_grouping(cfg) == "loraplus" and assemble.param_grouping(TrainingConfig()) == "single"
    opt = build_optimizer(net, cfg.optim, assemble.param_grouping(cfg))
    a_group, b_group = opt.param_groups
    assert a_group["lr"] == 1e-3 and b_group["lr"] == pytest.approx(16e-3)
    assert a_group["weight_decay"] == b_group["weight_decay"] == 0.01
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(b_group["params"]) == ids(p for n, p in net.named_parameters() if n.endswith("lora_B"))
    assert ids(a_group["params"]) == ids(p for n, p in net.named_parameters() if n.endswith("lora_A"))
    # Adam's first step moves every weight by ≈ lr (times sign, minus decay): B moves 16× more.
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    move = {n: float((p.detach() - before[n]).abs().mean()) for n, p in net.named_parameters()}
    assert move["q.lora_B"] / move["q.lora_A"] == pytest.approx(16.0, rel=0.02)


def test_loraplus_refused_with_prodigy():
    with pytest.raises(ConfigError, match="loraplus"):
        TrainingConfig.from_dict({"optim": {"loraplus_lr_ratio": 16.0, "optimizer": "prodigy"}})


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy", "adafactor", "lion8bit", "adamw_schedulefree"])
def test_every_optimizer_steps_and_lowers_a_quadratic(name):
    net = TinyLora()
    cfg = OptimConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2, weight_decay=0.0)
    opt = build_optimizer(net, cfg)
    if hasattr(opt, "train"):
        opt.train()
    loss = lambda: sum((p**2).sum() for p in net.parameters())  # noqa: E731
    start = float(loss().detach())
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()
    assert float(loss().detach()) < start


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match="adafactor"):
        OPTIMIZERS.get("sgdd")


def test_prodigy_warns_about_a_small_lr(caplog):
    with caplog.at_level(logging.WARNING):
        build_optimizer(TinyLora(), OptimConfig(optimizer="prodigy", lr=1e-4))
    assert "optim.lr=1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_optimizer(TinyLora(), OptimConfig(optimizer="prodigy", lr=1.0, prodigy_d_coef=2.0))
    assert caplog.text == ""


def test_schedulefree_needs_constant_schedule_and_switches_modes():
    with pytest.raises(ValueError, match="schedule='constant'"):
        build_optimizer(TinyLora(), OptimConfig(optimizer="adamw_schedulefree", schedule="cosine"))
    cfg = TrainingConfig.from_dict({"optim": {"optimizer": "adamw_schedulefree"}})
    callbacks = assemble.build_callbacks(cfg, None)
    cb = next(c for c in callbacks if isinstance(c, ScheduleFreeModeCallback))
    opt = build_optimizer(TinyLora(), cfg.optim)
    state = type("S", (), {"optimizer": opt})()
    cb.on_step_start(state)
    assert opt.param_groups[0]["train_mode"]
    cb.on_step_end(state, {})
    assert not opt.param_groups[0]["train_mode"]
