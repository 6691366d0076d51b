"""Preview seam: when and where previews are rendered, with which weights, and the demo renderer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import SIZE, make_config, one_thread, tiny_model, train, write_data  # noqa: F401 (fixture)

from trainer_core.config import TrainingConfig
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.run import DEMO_DEFAULTS, preview_callbacks
from trainer_core.demo.text import HashTextEncoder
from trainer_core.loop import RunState
from trainer_core.previews import PreviewCallback, demo_renderer, without_trigger

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A renderer that writes one small PNG and remembers what it saw."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, state: RunState, folder: Path) -> list[Path]:
        ema = state.extra.get("ema")
        self.calls.append({
            "step": state.step, "folder": folder.name, "training": state.model.module.training,
            "grad": torch.is_grad_enabled(),
            "ema_in": ema is not None and all(torch.equal(p.detach(), ema.shadow[n])
                                              for n, p in state.network.named_parameters()),
        })
        path = folder / "p0_trigger.png"
        Image.new("RGB", (16, 16)).save(path)
        return [path]


def test_previews_at_start_every_n_steps_and_end_with_the_ema(tmp_path):
    write_data(tmp_path / "data", count=2)
    render, shown = Recorder(), []
    cb = PreviewCallback(render, every_n_steps=2, on_images=shown.append)
    cfg = make_config(tmp_path / "data", steps=5, ema={"enabled": True, "decay": 0.5})
    train(cfg, tmp_path / "run", callbacks=[cb])
    assert [(c["step"], c["folder"]) for c in render.calls] == [
        (0, "baseline"), (2, "step_000002"), (4, "step_000004"), (5, "final")]
    assert all(not c["training"] and not c["grad"] for c in render.calls)  # eval mode, no grad
    assert all(c["ema_in"] for c in render.calls[1:])  # EMA weights swapped in
    previews = tmp_path / "run" / "previews"
    assert shown == [[previews / c["folder"] / "p0_trigger.png"] for c in render.calls]
    assert all((previews / c["folder"] / "p0_trigger.png").is_file() for c in render.calls)


def test_previews_use_raw_weights_without_ema_output(tmp_path):
    write_data(tmp_path / "data", count=2)
    render = Recorder()
    cfg = make_config(tmp_path / "data", steps=2, ema={"enabled": True, "decay": 0.9, "use_for_output": False})
    train(cfg, tmp_path / "run", callbacks=[PreviewCallback(render, every_n_steps=5)])
    assert [c["folder"] for c in render.calls] == ["baseline", "final"]
    assert not render.calls[-1]["ema_in"]


def test_previews_of_an_earlier_run_survive_a_resume(tmp_path):
    """Step-2 previews (no checkpoint at step 2) are not taken for a broken checkpoint and
    removed when the run resumes from its step-3 checkpoint."""
    write_data(tmp_path / "data", count=2)
    run = tmp_path / "run"
    train(make_config(tmp_path / "data", steps=3), run, callbacks=[PreviewCallback(Recorder(), every_n_steps=2)])
    earlier = run / "previews" / "step_000002" / "p0_trigger.png"
    assert earlier.is_file() and (run / "checkpoint_000003" / "COMPLETE").is_file()
    render = Recorder()
    result, _ = train(make_config(tmp_path / "data", steps=5), run, callbacks=[PreviewCallback(render, every_n_steps=2)])
    assert result.steps == 5 and [c["folder"] for c in render.calls] == ["step_000004", "final"]  # resumed at 3
    assert earlier.is_file(), "resuming deleted the earlier run's previews"
    assert not list(run.glob("checkpoint_*/*.png"))


def test_preview_callback_needs_a_positive_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        PreviewCallback(lambda s, f: [], every_n_steps=0)


def test_without_trigger_removes_the_whole_word_only():
    assert without_trigger("sks, a red ring", "sks") == "a red ring"
    assert without_trigger("a photo of sks dog, sksx", "sks") == "a photo of dog, sksx"
    assert without_trigger("sks", "sks") == ""


def test_demo_renderer_writes_trigger_and_plain_pngs(tmp_path):
    model = tiny_model()
    render = demo_renderer(DctCodec(), HashTextEncoder(), ["sks, a red ring object", "a blue background"], "sks",
                           seed=7, steps=3, size=SIZE)
    state = RunState(config=TrainingConfig(), model=model, network=None, optimizer=None, scheduler=None,
                     data=None, total_steps=1)
    paths = render(state, tmp_path)
    assert [p.name for p in paths] == ["p0_trigger.png", "p0_plain.png", "p1_trigger.png", "p1_plain.png"]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)
    assert not np.array_equal(images[0], images[1])  # the trigger word changes the picture
    (tmp_path / "again").mkdir()
    again = render(state, tmp_path / "again")
    assert all(np.array_equal(a, np.asarray(Image.open(p))) for a, p in zip(images, again))  # fixed seed


def test_demo_hooks_previews_in(tmp_path):
    assert DEMO_DEFAULTS["preview"]["every_n_steps"] == 100 and len(DEMO_DEFAULTS["preview"]["prompts"]) == 2
    cfg = TrainingConfig.from_dict(DEMO_DEFAULTS)
    (cb,) = preview_callbacks(cfg, DctCodec(), HashTextEncoder())
    assert isinstance(cb, PreviewCallback) and cb.every == 100
    off = cfg.replace(preview=cfg.preview.__class__(every_n_steps=0))
    assert preview_callbacks(off, DctCodec(), HashTextEncoder()) == []
