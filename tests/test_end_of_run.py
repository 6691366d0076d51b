"""The end of a run never loses it: an interrupt (Ctrl+C, ComfyUI's Cancel) in a forward
pass or in an end-of-training callback (the final previews), and weights an optimizer step
turned NaN, all leave the run folder complete, honest and resumable."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from trainer_core.checkpoint import list_checkpoints, load_checkpoint
from trainer_core.finite import all_finite
from trainer_core.loop import Callback, NonFiniteWeights
from trainer_core.previews import PreviewCallback


class FakeCancel(BaseException):
    """Like ComfyUI's InterruptProcessingException: a BaseException, not an Exception."""


def _status(run) -> dict:
    return json.loads((run / "training_state.json").read_text())


def _final_steps(run) -> int:
    with safe_open(str(run / "lora_final.safetensors"), "pt") as f:
        return int(f.metadata()["flowtrain.steps"])


class RaiseAtEnd(Callback):
    def __init__(self, error):
        self.error = error

    def on_train_end(self, state, reason):
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt, FakeCancel])
def test_interrupt_in_an_end_callback_listed_before_the_savers(tiny_training, error):
    cfg = tiny_training.config(**{"train.steps": 3})
    run = tiny_training.out / "run"
    with pytest.raises(error):
        tiny_training.train(cfg, callbacks=[RaiseAtEnd(error())])  # user callbacks come before the savers
    assert _final_steps(run) == 3
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert _status(run)["status"] == "finished" and _status(run)["step"] == 3
    assert tiny_training.train(cfg).reason == "already finished"


def test_an_error_at_the_end_is_raised_after_the_saving(tiny_training):
    with pytest.raises(RuntimeError, match="preview broke"):
        tiny_training.train(tiny_training.config(**{"train.steps": 2}), callbacks=[RaiseAtEnd(RuntimeError("preview broke"))])
    run = tiny_training.out / "run"
    assert _final_steps(run) == 2 and _status(run)["status"] == "finished"


def test_cancel_with_final_previews_saves_first(tiny_training):
    """ComfyUI: Cancel sets a flag (should_stop); the final previews' sampler then raises the
    pending interrupt. The LoRA, the checkpoint and the status are written before."""
    cancelled = {"flag": False}
    rendered = []

    def render(state, folder):
        if cancelled["flag"]:
            raise FakeCancel()
        rendered.append(folder.name)
        return []

    class CancelAt(Callback):
        def on_step_end(self, state, logs):
            cancelled["flag"] = cancelled["flag"] or state.step == 2

    cfg = tiny_training.config(**{"train.steps": 5})
    run = tiny_training.out / "run"
    with pytest.raises(FakeCancel):
        tiny_training.train(cfg, callbacks=[PreviewCallback(render, 100), CancelAt()],
                            should_stop=lambda: cancelled["flag"])
    assert rendered == ["baseline"]
    assert _final_steps(run) == 2 and [s for s, _ in list_checkpoints(run)] == [2]
    assert _status(run)["status"] == "stopped"
    resumed = tiny_training.train(cfg)
    assert (resumed.steps, resumed.reason) == (5, "finished")


@pytest.mark.parametrize("error", [KeyboardInterrupt, FakeCancel])
def test_interrupt_inside_a_forward_pass_stops_and_resumes_exactly(tiny_training, error):
    cfg = tiny_training.config(**{"train.steps": 4, "train.output_name": "whole"})
    whole = tiny_training.train(cfg).network.state_dict()

    class InterruptForward(Callback):
        """Wraps the model's forward: the third call (step 3) raises ``error``."""

        def on_train_start(self, state):
            module, calls = state.model.module, {"n": 0}
            real = module.forward

            def forward(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise error()
                return real(*args, **kwargs)

            module.forward = forward

    cfg = tiny_training.config(**{"train.steps": 4, "train.output_name": "cut"})
    run = tiny_training.out / "cut"
    with pytest.raises(error):
        tiny_training.train(cfg, callbacks=[InterruptForward()])
    state = _status(run)
    assert state["status"] == "stopped" and state["step"] == 2  # not "error: ..."
    assert _final_steps(run) == 2 and [s for s, _ in list_checkpoints(run)] == [2]

    resumed = tiny_training.train(cfg)
    assert (resumed.steps, resumed.reason) == (4, "finished")
    got = resumed.network.state_dict()
    assert all(torch.equal(got[k], whole[k]) for k in whole)


class PoisonStep(Callback):
    """Makes the optimizer's step ``at`` write NaN/inf into a weight or its Adam state;
    the loss of that step stays finite (it is computed before the optimizer step)."""

    def __init__(self, at: int, where: str):
        self.at, self.where = at, where

    def on_step_start(self, state):
        if state.step + 1 != self.at:
            return
        opt = state.optimizer
        real = opt.step

        def step(*args, **kwargs):
            out = real(*args, **kwargs)
            p = state.network.parameters()[0]
            with torch.no_grad():
                if self.where == "weight":
                    p.view(-1)[0] = float("nan")
                else:
                    opt.state[p]["exp_avg"].view(-1)[0] = float("inf")
            opt.step = real
            return out

        opt.step = step


@pytest.mark.parametrize("where", ["weight", "optimizer_state"])
def test_nonfinite_weights_stop_and_are_never_saved(tiny_training, where):
    cfg = tiny_training.config(**{"train.steps": 6, "train.save_every": 2})
    run = tiny_training.out / "run"
    with pytest.raises(NonFiniteWeights) as e:
        tiny_training.train(cfg, callbacks=[PoisonStep(3, where)])
    msg = str(e.value)
    assert "step 3" in msg and "learning rate too high" in msg and "fp16" in msg and "base-model weights" in msg
    assert "checkpoint_000002" in msg and "lora_final.safetensors was not written (there is none)" in msg
    assert [s for s, _ in list_checkpoints(run)] == [2]
    ckpt = load_checkpoint(run / "checkpoint_000002")
    assert all_finite(ckpt.tensors)
    assert not (run / "lora_final.safetensors").exists()
    assert _status(run)["status"].startswith("error: NonFiniteWeights")
    resumed = tiny_training.train(cfg)  # the next run resumes from the finite checkpoint
    assert (resumed.steps, resumed.reason) == (6, "finished")
    assert all_finite(resumed.network.state_dict())


def test_nonfinite_weights_keep_an_earlier_final_lora(tiny_training):
    cfg = tiny_training.config(**{"train.steps": 2})
    tiny_training.train(cfg)
    run = tiny_training.out / "run"
    before = (run / "lora_final.safetensors").read_bytes()
    longer = tiny_training.config(**{"train.steps": 4})
    with pytest.raises(NonFiniteWeights, match="the earlier one in the run folder is kept"):
        tiny_training.train(longer, callbacks=[PoisonStep(3, "weight")])
    assert (run / "lora_final.safetensors").read_bytes() == before


def test_all_finite_one_check_over_mixed_dtypes():
    good = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), {"s": torch.zeros(1)}, torch.arange(3)]
    assert all_finite(good)
    assert not all_finite(good, [torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)])
    assert not all_finite({"a": torch.tensor([float("nan")])})
    assert all_finite(torch.tensor([1e18, -1e18]))  # large but finite
