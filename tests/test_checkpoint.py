"""Checkpoint folders: no pickle, exact round trip, pruning, and crash safety under SIGKILL."""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.checkpoint import (COMPLETE, WRITING, flatten, is_complete, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, prune_checkpoints, remove_incomplete, unflatten)


def test_flatten_round_trips_optimizer_like_state():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7], "name": "lora",
                               "max": float("inf"), "none": None}]}
    tensors: dict[str, torch.Tensor] = {}
    skel = flatten(state, "optimizer", tensors)
    back = unflatten(json.loads(json.dumps(skel)), tensors)  # through real JSON
    assert set(back["state"]) == {0, 7}  # int keys survive
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["param_groups"][0]["max"] == float("inf") and back["param_groups"][0]["none"] is None
    with pytest.raises(TypeError, match="optimizer.bad.*object"):
        flatten({"bad": object()}, "optimizer", {})


def test_checkpoint_holds_everything_without_pickle(tiny_training):
    result = tiny_training.train(tiny_training.config(**{"train.save_every": 2}))
    folder = latest_checkpoint(result.run_dir)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [COMPLETE, "lora.safetensors", "optimizer_state.safetensors", "training_state.json"]
    doc = json.loads((folder / "training_state.json").read_text())
    assert doc["step"] == 4 and doc["micro_index"] == 4 and doc["epoch"] == 1 and len(doc["history"]) == 4
    assert doc["config"]["lora"]["rank"] == 4 and doc["model"]["arch"] == "flux1"
    tensors = load_file(folder / "optimizer_state.safetensors")
    assert tensors["rng.torch_cpu"].dtype == torch.uint8
    assert any(k.startswith("optimizer.state.") and k.endswith(".exp_avg") for k in tensors)
    assert any(k.startswith("lora.") for k in tensors)
    ckpt = load_checkpoint(folder)
    live = result.network.state_dict()
    assert all(torch.equal(ckpt.lora_state()[k], live[k]) for k in live)


def test_keep_last_k_and_ignore_incomplete(tiny_training):
    result = tiny_training.train(tiny_training.config(**{"train.steps": 5, "train.save_every": 1,
                                                         "train.keep_checkpoints": 2}))
    run = result.run_dir
    assert [s for s, _ in list_checkpoints(run)] == [4, 5]
    fake = run / "checkpoint_000009"
    fake.mkdir()
    (fake / WRITING).write_text("step 9\n")  # what a write cut short by a crash leaves
    (fake / "lora.safetensors").write_bytes(b"partial")
    foreign = run / "checkpoint_000007"  # an older FlowTrain's previews: not written by a checkpoint save
    foreign.mkdir()
    (foreign / "p0_trigger.png").write_bytes(b"png")
    assert latest_checkpoint(run).name == "checkpoint_000005"  # no COMPLETE: ignored
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(fake)
    assert remove_incomplete(run) == [fake] and not fake.exists()
    assert (foreign / "p0_trigger.png").is_file()
    assert prune_checkpoints(run, 1) == [run / "checkpoint_000004"]
    assert prune_checkpoints(run, 1) == []  # the newest complete one is never deleted


# ------------------------------------------------------------------ SIGKILL at random moments
# Imported once by the fork server, so each killed child starts in a fraction of a second.
PRELOAD = ["torch", "peft", "diffusers.models.transformers.transformer_flux", "trainer_core.session",
           "trainer_core.models.diffusers_flux", "trainer_core.demo.codec", "trainer_core.demo.text", "conftest"]
def _crash_worker(root: str, report: str) -> None:
    """Child: resume the run in ``root`` (save every step) and report the start step."""
    from conftest import TinyTraining

    from trainer_core.atomic import atomic_write_text
    from trainer_core.loop import Callback

    class Report(Callback):
        def on_train_start(self, state):
            atomic_write_text(Path(report), str(state.step))

    t = TinyTraining(Path(root))
    t.train(t.config(**{"train.steps": 1_000_000, "train.save_every": 1, "train.keep_checkpoints": 3}),
            callbacks=[Report()])


def _check_folders(run: Path) -> int:
    """Every folder that looks complete loads; returns the newest complete step (0: none)."""
    for step, folder in list_checkpoints(run):
        ckpt = load_checkpoint(folder)
        assert ckpt.step == step and ckpt.lora_state()
        assert load_file(folder / "lora.safetensors")
    done = list_checkpoints(run)
    return done[-1][0] if done else 0


def test_sigkill_never_leaves_a_broken_complete_checkpoint(tiny_training):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    run = tiny_training.out / "run"
    report = tiny_training.root / "started"
    rng = random.Random(0)
    mid_save = 0
    for kill in range(20):
        expected = _check_folders(run)
        report.unlink(missing_ok=True)
        proc = ctx.Process(target=_crash_worker, args=(str(tiny_training.root), str(report)))
        proc.start()
        deadline = time.monotonic() + 180  # generous: a loaded machine starts the worker slowly
        while not report.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert report.exists(), f"worker did not start (exit code {proc.exitcode})"
        assert int(report.read_text()) == expected  # resumed from the newest complete checkpoint
        if kill == 0:  # the first worker lives until a checkpoint is complete, so later ones resume from one
            while not list_checkpoints(run) and proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.join()
        incomplete = [p for _, p in list_checkpoints(run, complete=False) if not is_complete(p)]
        mid_save += bool(incomplete)
    final = _check_folders(run)
    assert final > 0
    print(f"\n20 SIGKILLs: newest complete step {final}; {mid_save} kills landed mid-save")
