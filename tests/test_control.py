"""Control files (.pause, .checkpoint, .stop), stop requests, interrupts and NaN losses:
each ends or continues as documented and never loses a finished step."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors import safe_open

import trainer_core.control as control
from trainer_core.checkpoint import is_complete, list_checkpoints, load_checkpoint
from trainer_core.loop import NonFiniteLoss


def _touch_at(path, step: int):
    """A progress callable that creates ``path`` when ``step`` finishes."""
    def progress(s, total, logs):
        if s == step:
            path.touch()
    return progress


def _final_steps(path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["flowtrain.steps"]


class _RaiseAt:
    """A loss term that misbehaves on the optimizer step with 0-based index ``step``."""

    name = "fault"

    def __init__(self, step: int, fault):
        self.step, self.fault = step, fault

    def __call__(self, ctx):
        if ctx.step != self.step:
            return None
        if self.fault == "nan":
            return ctx.predict().sum() * float("nan")
        raise self.fault


def test_checkpoint_file_saves_and_continues(tiny_training):
    run = tiny_training.out / "run"
    result = tiny_training.train(tiny_training.config(), progress=_touch_at(run / ".checkpoint", 2))
    assert (result.steps, result.reason) == (4, "finished")
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert not (run / ".checkpoint").exists()


def test_checkpoint_file_also_renders_the_runs_previews(tiny_training):
    """Save now = a checkpoint and the previews set for the run (issue #15), then training goes on."""
    from trainer_core.demo.codec import DctCodec
    from trainer_core.demo.run import preview_callbacks
    from trainer_core.demo.text import HashTextEncoder

    run = tiny_training.out / "run"
    cfg = tiny_training.config(**{"train.steps": 5, "preview.every_n_steps": 4, "preview.prompts": ["sks, a ring"],
                                  "preview.steps": 1, "preview.width": 64, "preview.height": 64})
    previews = preview_callbacks(cfg, DctCodec(), HashTextEncoder())
    result = tiny_training.train(cfg, callbacks=previews, progress=_touch_at(run / ".checkpoint", 2))
    assert (result.steps, result.reason) == (5, "finished")
    assert [s for s, _ in list_checkpoints(run)] == [2, 5]
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["baseline", "final", "step_000002", "step_000004"]
    assert sorted(p.name for p in (run / "previews" / "step_000002").iterdir()) == ["p0_plain.png", "p0_trigger.png"]
    assert not (run / ".checkpoint").exists()


def test_checkpoint_file_at_a_preview_step_renders_once(tiny_training):
    calls = []

    def render(state, folder):
        calls.append(folder.name)
        return []

    from trainer_core.previews import PreviewCallback

    run = tiny_training.out / "run"
    result = tiny_training.train(tiny_training.config(), callbacks=[PreviewCallback(render, 2)],
                                 progress=_touch_at(run / ".checkpoint", 2))
    assert result.steps == 4 and calls == ["baseline", "step_000002", "final"]
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


def test_stop_file_ends_gracefully(tiny_training):
    run = tiny_training.out / "run"
    result = tiny_training.train(tiny_training.config(**{"train.steps": 6}), progress=_touch_at(run / ".stop", 2))
    assert (result.steps, result.reason) == (2, "stopped (.stop file)")
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert _final_steps(result.lora_path) == "2" and not (run / ".stop").exists()


def test_pause_waits_until_the_file_is_removed(tiny_training, monkeypatch):
    monkeypatch.setattr(control, "POLL_S", 0.02)
    run = tiny_training.out / "run"
    run.mkdir(parents=True)
    (run / control.PAUSE).touch()
    seen = {}

    def unpause():
        deadline = time.monotonic() + 30
        while not is_complete(run / "checkpoint_000001") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        seen["steps_while_paused"] = sorted(s for s, _ in list_checkpoints(run))
        (run / control.PAUSE).unlink()

    thread = threading.Thread(target=unpause)
    thread.start()
    steps: list[int] = []
    result = tiny_training.train(tiny_training.config(), progress=lambda s, t, logs: steps.append(s))
    thread.join()
    assert (result.steps, result.reason) == (4, "finished")
    assert seen["steps_while_paused"] == [1]  # saved at the pause, and no further step ran during it
    assert steps == [1, 2, 3, 4]


def test_cancel_while_paused_stops(tiny_training, monkeypatch):
    monkeypatch.setattr(control, "POLL_S", 0.02)
    run = tiny_training.out / "run"
    run.mkdir(parents=True)
    (run / control.PAUSE).touch()
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    result = tiny_training.train(tiny_training.config(), should_stop=cancel.is_set)
    assert (result.steps, result.reason) == (1, "stopped")
    assert [s for s, _ in list_checkpoints(run)] == [1] and result.lora_path.is_file()


class Interrupt(BaseException):
    """Like ComfyUI's InterruptProcessingException: not an Exception."""


def test_interrupt_mid_step_checkpoints_the_last_finished_step(tiny_training):
    with pytest.raises(Interrupt):
        tiny_training.train(tiny_training.config(), extra_terms=[_RaiseAt(2, Interrupt("cancel"))])
    run = tiny_training.out / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert _final_steps(run / "lora_final.safetensors") == "2"
    resumed = tiny_training.train(tiny_training.config())  # and it resumes from there
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]


def test_nan_loss_stops_keeps_last_good_state_and_says_so(tiny_training):
    cfg = tiny_training.config(**{"train.steps": 6})
    with pytest.raises(NonFiniteLoss) as e:
        tiny_training.train(cfg, extra_terms=[_RaiseAt(2, "nan")])
    msg = str(e.value)
    run = tiny_training.out / "run"
    assert "at step 3" in msg and "checkpoint_000002" in msg and "lower optim.lr" in msg
    assert [s for s, _ in list_checkpoints(run)] == [2]
    # the saved state is exactly that of a clean 2-step run (the NaN step changed nothing)
    clean = tiny_training.train(tiny_training.config(**{"train.steps": 2, "train.output_name": "clean"}))
    saved = load_checkpoint(run / "checkpoint_000002").lora_state()
    ref = clean.network.state_dict()
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_stop_file_while_paused_ends_the_run_normally(tiny_training, monkeypatch):
    monkeypatch.setattr(control, "POLL_S", 0.02)
    run = tiny_training.out / "run"
    run.mkdir(parents=True)
    control.request(run, "pause")
    phases: list[str] = []

    def on_phase(phase, n, total, info):
        phases.append(phase)
        if phase == "paused":
            threading.Timer(0.2, control.request, (run, "stop")).start()

    result = tiny_training.train(tiny_training.config(**{"train.steps": 6}), phase_progress=on_phase)
    assert (result.steps, result.reason) == (1, "stopped (.stop file)")
    assert _final_steps(result.lora_path) == "1" and not (run / control.STOP).exists()
    assert (run / control.PAUSE).exists()  # the pause file is the user's: left as it was
    i = phases.index("paused")
    assert phases[i + 1] == "training" and "stopping" in phases[i + 1:] and phases[-1] == "done"


def test_save_request_while_paused_keeps_the_pause_checkpoint_and_consumes_the_file(tiny_training, monkeypatch):
    monkeypatch.setattr(control, "POLL_S", 0.02)
    run = tiny_training.out / "run"
    run.mkdir(parents=True)
    control.request(run, "pause")

    def on_phase(phase, n, total, info):
        if phase == "paused":
            control.request(run, "save")
            threading.Timer(0.3, control.request, (run, "resume")).start()

    result = tiny_training.train(tiny_training.config(), phase_progress=on_phase)
    assert (result.steps, result.reason) == (4, "finished")
    assert [s for s, _ in list_checkpoints(run)] == [1, 4] and not (run / control.CHECKPOINT).exists()


def test_progress_reports_seconds_per_step_and_an_eta_that_reaches_zero(tiny_training):
    seen: list[tuple] = []
    tiny_training.train(tiny_training.config(),
                        progress=lambda s, t, logs: seen.append((s, logs["s_per_it"], logs["eta"])))
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert all(r is not None and r > 0 for _, r, _ in seen)
    assert [round(eta / r, 6) for _, r, eta in seen] == [3, 2, 1, 0]


def test_control_state_and_refusals_follow_the_phase_and_the_files(tmp_path):
    run = tmp_path
    assert control.control_state("encoding images", run) == "starting"
    assert control.refusal("encoding images", run, "pause").startswith("the run is starting")
    assert control.control_state("training", run) == "running"
    assert control.refusal("training", run, "resume") == "the run is not paused"
    assert control.refusal("training", run, "jump").startswith("unknown action 'jump'")
    with pytest.raises(ValueError, match="unknown control action"):
        control.request(run, "jump")
    control.request(run, "pause")
    assert control.control_state("training", run) == "pausing"
    assert control.refusal("training", run, "pause") == "the run is already pausing"
    assert control.control_state("saving", run) == "saving"
    assert control.control_state("paused", run) == "paused"
    control.request(run, "resume")
    assert not (run / control.PAUSE).exists() and control.control_state("paused", run) == "resuming"
    control.request(run, "save")
    assert control.control_state("training", run) == "saving"
    control.request(run, "stop")
    assert control.control_state("training", run) == "stopping"
    assert control.refusal("training", run, "save") == "the run is stopping"
    assert control.control_state("done", run) == "done" and control.refusal("done", run, "stop")
