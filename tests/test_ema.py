"""EMA of the LoRA weights: diffusers' warmup decay, update rate, swapping, state."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer_core import assemble
from trainer_core.config import EmaConfig, TrainingConfig
from trainer_core.ema import EmaCallback, LoraEMA, ema_decay


class TinyLora:
    """LoraNetwork's API (named_parameters / state_dict / load_state_dict) on two tensors."""

    def __init__(self):
        self.params = {"l.lora_A": nn.Parameter(torch.zeros(2, 3)), "l.lora_B": nn.Parameter(torch.zeros(3, 2))}

    def named_parameters(self):
        return iter(self.params.items())

    def parameters(self):
        return list(self.params.values())

    def state_dict(self):
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])


def _set(net, value):
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 1000, 10**6])
def test_decay_matches_the_formula_and_diffusers(k):
    decay, power, inv_gamma = 0.999, 2 / 3, 1.0
    s = max(0, k - 1)
    want = 0.0 if s == 0 else min(decay, 1 - (1 + s / inv_gamma) ** -power)
    assert ema_decay(k, decay=decay, power=power, inv_gamma=inv_gamma) == pytest.approx(want)
    from diffusers.training_utils import EMAModel

    ref = EMAModel([nn.Parameter(torch.zeros(1))], decay=decay, use_ema_warmup=True, power=power, inv_gamma=inv_gamma)
    assert ema_decay(k, decay=decay, power=power, inv_gamma=inv_gamma) == pytest.approx(ref.get_decay(k))


def test_ema_moves_at_the_expected_rate():
    net = TinyLora()
    cfg = EmaConfig(enabled=True, decay=0.9, power=1.0, inv_gamma=1.0)
    ema = LoraEMA(net, cfg)
    shadow = 0.0
    for step in range(1, 6):
        _set(net, float(step))
        d = ema.update(step)
        want_d = 0.0 if step == 1 else min(0.9, 1 - (1 + (step - 1)) ** -1.0)
        assert d == pytest.approx(want_d)
        shadow = want_d * shadow + (1 - want_d) * step
        torch.testing.assert_close(ema.shadow["l.lora_B"], torch.full((3, 2), shadow))


def test_update_every_skips_steps_and_counts_updates():
    net = TinyLora()
    ema = LoraEMA(net, EmaConfig(update_every=3, on_cpu=True))
    assert [ema.update(s) is not None for s in range(1, 7)] == [False, False, True, False, False, True]
    assert ema.updates == 2 and ema.shadow["l.lora_A"].device.type == "cpu"


def test_swapped_in_restores_raw_weights_even_on_error():
    net = TinyLora()
    ema = LoraEMA(net, EmaConfig())
    _set(net, 1.0)
    ema.update(1)  # first update copies: shadow = 1
    _set(net, 5.0)
    with ema.swapped_in():
        assert float(net.params["l.lora_A"].detach()[0, 0]) == 1.0
    assert float(net.params["l.lora_A"].detach()[0, 0]) == 5.0
    with pytest.raises(RuntimeError):
        with ema.swapped_in():
            raise RuntimeError("boom")
    assert float(net.params["l.lora_B"].detach()[0, 0]) == 5.0


def test_state_dict_round_trip():
    net = TinyLora()
    ema = LoraEMA(net, EmaConfig())
    _set(net, 2.0)
    ema.update(1)
    ema.update(2)
    state = ema.state_dict()
    other = LoraEMA(TinyLora(), EmaConfig())
    other.load_state_dict(state)
    assert other.updates == 2
    torch.testing.assert_close(other.shadow["l.lora_A"], ema.shadow["l.lora_A"])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"updates": 0, "tensors": {}})


def test_callback_is_built_from_config_and_updates_after_each_step():
    assert not any(isinstance(c, EmaCallback) for c in assemble.build_callbacks(TrainingConfig(), None))
    cfg = TrainingConfig.from_dict({"ema": {"enabled": True}})
    cb = next(c for c in assemble.build_callbacks(cfg, None) if isinstance(c, EmaCallback))
    state = SimpleNamespace(network=TinyLora(), extra={}, step=0)
    cb.on_train_start(state)
    ema = state.extra["ema"]
    state.step = 1
    logs = {}
    cb.on_step_end(state, logs)
    assert logs["ema_decay"] == 0.0 and ema.updates == 1
