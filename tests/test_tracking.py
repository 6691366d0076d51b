"""TensorBoard event files (tracking.py), read back with tensorboard's own reader."""
from __future__ import annotations

import logging
import sys
import types

import pytest
from tiny_run import make_config, one_thread, train, write_data  # noqa: F401 (fixture)

from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.previews import PreviewCallback, demo_renderer
from trainer_core.tracking import tracking_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_event_files_hold_losses_lr_validation_sigma_bins_and_previews(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    write_data(tmp_path / "data", count=4)
    cfg = make_config(tmp_path / "data", steps=4, train={"log_every": 2},
                      validation={"every_n_steps": 2, "images": 1}, loss={"sigma_bins": 4},
                      preview={"every_n_steps": 2, "prompts": ["a sks"], "steps": 2, "width": 64, "height": 64})
    render = demo_renderer(DctCodec(), HashTextEncoder(), cfg.preview.prompts, "sks", seed=0, steps=2, size=64)
    with caplog.at_level(logging.INFO, logger="trainer_core.tracking"):
        result, _ = train(cfg, tmp_path / "run", callbacks=[PreviewCallback(render, 2)])
    folder = tmp_path / "run" / "tensorboard"
    assert any(f"tensorboard --logdir {folder}" in r.getMessage() for r in caplog.records)

    acc = _events(folder)
    tags = acc.Tags()
    losses = [(e.step, e.value) for e in acc.Scalars("loss/total")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(abs(v - h["loss"]) < 1e-6 for (_, v), h in zip(losses, result.history))
    assert [e.step for e in acc.Scalars("loss/flow")] == [1, 2, 3, 4]
    assert {"lr", "grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("validation/loss")] == [0, 2, 4]  # the baseline, then every 2 steps
    bins = [t for t in tags["scalars"] if t.startswith("loss_by_sigma/")]
    assert bins and all(t in {"loss_by_sigma/0.00-0.25", "loss_by_sigma/0.25-0.50", "loss_by_sigma/0.50-0.75",
                               "loss_by_sigma/0.75-1.00"} for t in bins)
    assert {e.step for t in bins for e in acc.Scalars(t)} <= {2, 4}
    # previews: baseline (step 0), step 2, final (step 4), each with and without the trigger
    assert sorted(t for t in tags["images"]) == ["preview/p0_plain", "preview/p0_trigger"]
    assert [e.step for e in acc.Images("preview/p0_trigger")] == [0, 2, 4]
    assert acc.Images("preview/p0_trigger")[0].width == 64


def test_tensorboard_can_be_turned_off(tmp_path):
    write_data(tmp_path / "data", count=2)
    train(make_config(tmp_path / "data", steps=1, train={"tensorboard": False}), tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_is_used_only_when_installed_and_configured(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["project"])) or object(),
                                 log=lambda d, step: calls.append(("log", step, sorted(d))),
                                 finish=lambda: calls.append(("finish",)))
    cfg = make_config(tmp_path, train={"tensorboard": False})
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert tracking_callbacks(cfg, tmp_path) == []
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a warning, no callback
    assert tracking_callbacks(cfg, tmp_path) == []
    monkeypatch.setitem(sys.modules, "wandb", fake)
    write_data(tmp_path / "data", count=2)
    train(make_config(tmp_path / "data", steps=2, train={"tensorboard": False}), tmp_path / "run")
    assert calls[0] == ("init", "proj") and calls[-1] == ("finish",)
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2] and "loss/total" in calls[1][2]
