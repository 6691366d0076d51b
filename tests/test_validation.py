"""Validation loss: fixed inputs, eval mode, EMA weights, files, and no effect on training."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_run import make_config, one_thread, tiny_model, train, write_data  # noqa: F401 (fixture)

from trainer_core.config import EmaConfig
from trainer_core.data.dataset import prepare_dataset
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.ema import LoraEMA
from trainer_core.loop import RunState
from trainer_core.lora.network import LoraNetwork
from trainer_core.validation import ValidationCallback, ValidationSet, output_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_validation_does_not_change_training_and_is_recorded(tmp_path):
    write_data(tmp_path / "data", count=3)
    write_data(tmp_path / "val", count=2)  # a separate validation folder: the training data stays the same
    common = {"steps": 5, "lora": {"dropout": 0.1}}  # dropout: training draws from the global RNG too
    off, _ = train(make_config(tmp_path / "data", **common), tmp_path / "off")
    on, _ = train(make_config(tmp_path / "data", validation={"every_n_steps": 2, "path": str(tmp_path / "val")},
                              **common), tmp_path / "on")
    a, b = off.network.state_dict(), on.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "off" / "validation.json").exists()

    doc = json.loads((tmp_path / "on" / "validation.json").read_text())
    assert [h["step"] for h in doc["history"]] == [0, 2, 4, 5]  # baseline, every 2, the last step
    assert doc["sigmas"] == [0.1, 0.25, 0.5, 0.75, 0.9] and doc["held_out"] is True
    assert len(doc["images"]) == 2 and all(str(tmp_path / "val") in p for p in doc["images"])
    for h in doc["history"]:
        assert len(h["per_sigma"]) == 5 and abs(h["loss"] - sum(h["per_sigma"]) / 5) < 1e-6
    assert "validation" in (tmp_path / "on" / "learning_curve.svg").read_text()


def _state(tmp_path, dropout: float = 0.0, **sections):
    write_data(tmp_path / "data", count=2)
    cfg = make_config(tmp_path / "data", lora={"dropout": dropout}, **sections)
    ds = prepare_dataset(cfg.data, DctCodec(), HashTextEncoder(), cache_dir=tmp_path / "cache", pixel_multiple=16, seed=0)
    model = tiny_model()
    network = LoraNetwork.inject(model.module, cfg.lora, model.default_targets["all"])
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    state = RunState(config=cfg, model=model, network=network, optimizer=None, scheduler=None, data=ds, total_steps=10)
    state.extra["validation_data"] = ds
    return state


def test_validation_is_fixed_and_runs_in_eval_mode(tmp_path):
    state = _state(tmp_path, dropout=0.5, validation={"every_n_steps": 1, "images": 2})
    state.model.module.train()
    cb = ValidationCallback(state.config.validation)
    cb.on_train_start(state)  # the step-0 baseline
    torch.manual_seed(123)  # the global RNG does not matter
    second = cb.evaluate(state)
    assert state.extra["curves"]["validation"] == [(0, second), (0, second)]
    assert state.model.module.training  # train mode restored
    # the same loss in train mode would differ between calls (LoRA dropout 0.5): eval mode matters
    vset = ValidationSet(state.data, state.config.validation)
    assert not torch.equal(vset.loss(state.model, 1.0), vset.loss(state.model, 1.0))


def test_validation_uses_the_ema_weights_when_the_run_outputs_them(tmp_path):
    state = _state(tmp_path, ema={"enabled": True})
    ema = LoraEMA(state.network, EmaConfig(enabled=True))
    for t in ema.shadow.values():
        t.zero_()  # EMA = the base model
    state.extra["ema"] = ema
    raw = state.network.state_dict()
    with output_weights(state) as which:
        assert which == "ema" and all(float(p.abs().sum()) == 0 for p in state.network.parameters())
    assert all(torch.equal(p, raw[n]) for n, p in state.network.named_parameters())

    vset = ValidationSet(state.data, state.config.validation)
    with state.network.disabled():
        base = vset.loss(state.model, 1.0)
    cb = ValidationCallback(state.config.validation.__class__(every_n_steps=1))
    cb.vset = vset
    assert abs(cb.evaluate(state) - float(base.mean())) < 1e-6
    state.config = state.config.replace(ema=EmaConfig(enabled=True, use_for_output=False))
    assert abs(cb.evaluate(state) - float(base.mean())) > 1e-3  # raw weights now


class _SeenSources:
    """A loss term that adds nothing and records every training batch's image files."""

    name = "seen"

    def __init__(self):
        self.sources: set[str] = set()

    def __call__(self, ctx):
        self.sources.update(ctx.batch.sources)
        return None


def test_validation_uses_only_held_out_images_and_keeps_the_best_lora(tmp_path):
    from safetensors import safe_open

    from trainer_core.session import train_lora

    write_data(tmp_path / "data", count=5)
    cfg = make_config(tmp_path / "data", steps=6, validation={"every_n_steps": 2, "images": 2})
    seen = _SeenSources()
    result = train_lora(cfg, tiny_model(), DctCodec(), HashTextEncoder(), run_dir=tmp_path / "run", extra_terms=[seen])
    doc = json.loads((tmp_path / "run" / "validation.json").read_text())
    held = set(doc["images"])
    assert len(held) == 2 and doc["held_out"] is True
    assert seen.sources and not (held & seen.sources)  # never in a training batch
    assert len(seen.sources) == 3 and result.dataset_summary["images"] == 3
    # best/: the LoRA of the step with the lowest validation loss after training started
    trained = [h for h in doc["history"] if h["step"] > 0]
    best = min(trained, key=lambda h: h["loss"])
    kept = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert (kept["step"], kept["validation_loss"]) == (best["step"], best["loss"]) == tuple(doc["best"].values())
    with safe_open(str(tmp_path / "run" / "best" / "lora.safetensors"), framework="pt") as f:
        md = f.metadata()
    assert md["flowtrain.steps"] == str(best["step"]) and md["ss_num_validation_images"] == "2"


def test_holdout_is_seeded_and_refuses_to_hold_out_everything(tmp_path):
    from pathlib import Path

    from trainer_core.data.holdout import held_out_sources

    files = [Path(f"/d/{i}.png") for i in range(6)] * 2  # an image at two resolutions is one image
    a = held_out_sources(files, 2, seed=1)
    assert a == held_out_sources(list(reversed(files)), 2, seed=1) and len(set(a)) == 2
    assert any(held_out_sources(files, 2, seed=s) != a for s in range(2, 6))
    with pytest.raises(ValueError, match="validation.images=6 would hold out all 6"):
        held_out_sources(files, 6, seed=1)


def test_resume_refuses_a_change_of_the_held_out_images():
    from trainer_core.config import TrainingConfig
    from trainer_core.resume import config_changes

    def cfg(**v):
        return TrainingConfig.from_dict({"validation": v}).to_dict()

    on = cfg(every_n_steps=10, images=2)
    for changed in (cfg(every_n_steps=10, images=3), cfg(every_n_steps=10, images=2, seed=5), cfg(every_n_steps=0),
                    cfg(every_n_steps=10, path="/elsewhere")):
        unsafe, _, _ = config_changes(on, changed, {}, {})
        assert any(u.startswith("validation.held_out") for u in unsafe), changed["validation"]
    unsafe, safe, _ = config_changes(on, cfg(every_n_steps=20, images=2, sigmas=[0.5]), {}, {})
    assert not unsafe and len(safe) == 2  # how often and at which σ does not change what is trained
