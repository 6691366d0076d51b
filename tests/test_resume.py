"""Exact resume: a run stopped at step k and resumed equals an uninterrupted run, bit for bit
(CPU, fp32), with LoRA dropout, gradient accumulation, a stop mid-epoch and an EMA."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint


def _stop_after(k: int):
    seen: list[int] = []
    return (lambda step, total, logs: seen.append(step)), (lambda: bool(seen) and seen[-1] >= k)


@pytest.mark.parametrize("extra", [{}, {"ema.enabled": True, "ema.decay": 0.9}], ids=["plain", "ema"])
def test_stop_and_resume_equals_uninterrupted(tiny_training, extra):
    # 4 images, batch 1, grad_accum 2: an epoch is 2 optimizer steps, so step 3 ends mid-epoch
    settings = {"optim.grad_accum": 2, "lora.dropout": 0.2, "train.steps": 5, "train.save_every": 2,
                "data.captions.caption_dropout": 0.3, **extra}
    full = tiny_training.train(tiny_training.config(**settings, **{"train.output_name": "full"}))
    assert full.steps == 5 and full.reason == "finished"

    cfg = tiny_training.config(**settings, **{"train.output_name": "split"})
    progress, stop = _stop_after(3)
    first = tiny_training.train(cfg, progress=progress, should_stop=stop)
    assert (first.steps, first.reason) == (3, "stopped")
    # the stop wrote a resumable checkpoint of step 3, not only lora_final
    assert latest_checkpoint(first.run_dir).name == "checkpoint_000003"
    first.network.remove()

    second = tiny_training.train(cfg)  # a fresh model: everything comes from the checkpoint
    assert (second.steps, second.reason) == (5, "finished")
    a, b = full.network.state_dict(), second.network.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    fa, fb = load_file(full.lora_path), load_file(second.lora_path)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    if extra:
        ea = load_checkpoint(latest_checkpoint(full.run_dir)).part("ema")
        eb = load_checkpoint(latest_checkpoint(second.run_dir)).part("ema")
        assert ea["updates"] == eb["updates"] == 5
        assert all(torch.equal(ea["tensors"][k], eb["tensors"][k]) for k in ea["tensors"])


def test_unsafe_change_is_refused_naming_the_fields(tiny_training):
    tiny_training.train(tiny_training.config())
    changed = tiny_training.config(**{"lora.rank": 8, "train.seed": 7, "train.steps": 6})
    with pytest.raises(ValueError) as e:
        tiny_training.train(changed)
    msg = str(e.value)
    assert "lora.rank: 4 -> 8" in msg and "train.seed: 42 -> 7" in msg and "output_name" in msg
    assert "train.steps" not in msg


def test_safe_change_resumes_and_is_logged(tiny_training, caplog):
    tiny_training.train(tiny_training.config(**{"train.steps": 3}))
    caplog.set_level(logging.INFO, logger="trainer_core")
    more = tiny_training.train(tiny_training.config(**{"train.steps": 5, "train.log_every": 7}))
    assert (more.steps, more.reason) == (5, "finished")
    assert [h["step"] for h in more.history] == [1, 2, 3, 4, 5]
    assert "train.steps: 3 -> 5" in caplog.text and "train.log_every: 100 -> 7" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint_000003" in caplog.text


def test_finished_run_is_not_retrained(tiny_training):
    cfg = tiny_training.config()
    done = tiny_training.train(cfg)
    final_bytes = done.lora_path.read_bytes()
    calls: list[int] = []
    again = tiny_training.train(cfg, progress=lambda s, t, logs: calls.append(s))
    assert again.reason == "already finished" and again.steps == 4 and calls == []
    assert again.lora_path.read_bytes() == final_bytes
    a, b = done.network.state_dict(), again.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the model carries the trained LoRA


def test_existing_run_refuse_never_overwrites(tiny_training):
    tiny_training.train(tiny_training.config())
    before = tiny_training.out.joinpath("run", "lora_final.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*existing_run='refuse'"):
        tiny_training.train(tiny_training.config(**{"train.existing_run": "refuse", "train.steps": 8}))
    assert tiny_training.out.joinpath("run", "lora_final.safetensors").read_bytes() == before


def test_resume_from_an_explicit_checkpoint(tiny_training):
    cfg = tiny_training.config(**{"train.save_every": 1, "train.keep_checkpoints": 0})
    full = tiny_training.train(cfg)
    assert [s for s, _ in list_checkpoints(full.run_dir)] == [1, 2, 3, 4]
    other = tiny_training.config(**{"train.output_name": "branch",
                                    "train.resume_from": str(full.run_dir / "checkpoint_000002")})
    branch = tiny_training.train(other)
    assert [h["step"] for h in branch.history] == [1, 2, 3, 4]
    a, b = full.network.state_dict(), branch.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tiny_training):
    cfg = tiny_training.config(**{"train.save_every": 1, "train.keep_checkpoints": 0})
    tiny_training.train(cfg)
    run = tiny_training.out / "run"
    again = tiny_training.train(tiny_training.config(**{"train.save_every": 1, "train.keep_checkpoints": 0,
                                                       "train.steps": 5, "optim.lr": 2e-3,
                                                       "train.resume_from": str(run / "checkpoint_000002")}))
    assert again.steps == 5 and [s for s, _ in list_checkpoints(run)] == [1, 2, 3, 4, 5]
    assert len(list(run.glob("checkpoint_00000[34].superseded-*"))) == 2
    assert load_checkpoint(run / "checkpoint_000004").doc["config"]["optim"]["lr"] == 2e-3
