"""Data-parallel training (``trainer_core/distributed.py``) on CPU with the gloo backend:
two ranks with batch 1 train the same LoRA as one process with batch 2, through a ``.stop``
and a resume; rank 0 alone writes files. The ranks are started the way users start them,
with ``python -m torch.distributed.run`` (torchrun)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


HERE = Path(__file__).parent
ROOT = HERE.parent
# grad_accum 2 over 3 images: every step has a micro-batch of 2 and one of 1 (a rank with
# no sample of its own then joins with weight 0); caption dropout and flips are per-sample
# random choices the ranks must draw exactly as one process does.
SETTINGS = {"optim.grad_accum": 2, "data.captions.caption_dropout": 0.3, "data.augment.flip": True,
            "train.steps": 4}


def torchrun(tmp: Path, name: str, spec: dict, *args: str) -> subprocess.CompletedProcess:
    """Start ``args`` (default: ``dist_entry.py`` with ``spec``) as 2 ranks; fails the test on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not args:
        spec_path = tmp / f"{name}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        args = (str(HERE / "dist_entry.py"), str(spec_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def ranks(results: Path, run: str) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(json.loads((results / f"{run}_rank{r}.json").read_text()), load_file(results / f"{run}_rank{r}.safetensors"))
            for r in (0, 1)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow  # two torchrun processes: ~30 s of CPU, mostly importing torch twice
def test_two_ranks_batch_1_equal_one_process_batch_2_through_stop_and_resume(tiny_training, tmp_path):
    t = tiny_training
    for extra in t.data.glob("img3.*"):  # 3 images
        extra.unlink()
    single = t.train(t.config(**SETTINGS, **{"data.batch_size": 2, "train.output_name": "single"}))
    assert (single.steps, single.reason) == (4, "finished")
    reference = {k: v.detach().clone() for k, v in single.network.state_dict().items()}

    config = t.config(**SETTINGS, **{"data.batch_size": 1, "train.output_name": "dist",
                                     "data.cache_dir": str(tmp_path / "cache")})
    other_out = tmp_path / "rank1_out"  # ranks > 0 get their own output_dir: it must stay untouched
    spec = {"config": config.to_dict(), "other_ranks_output_dir": str(other_out)}

    results = tmp_path / "results"
    results.mkdir()
    # one launch, two trainings: the second (a fresh model) resumes from the first's .stop checkpoint
    torchrun(tmp_path, "dist", {**spec, "results": str(results),
                                "runs": [{"name": "first", "stop_at": 2}, {"name": "second"}]})
    for summary, _ in ranks(results, "first"):
        assert (summary["steps"], summary["reason"]) == (2, "stopped (.stop file)")
    run = tmp_path / "out" / "dist"
    assert (run / "checkpoint_000002" / "COMPLETE").is_file() and not (run / ".stop").exists()
    (s0, lora0), (s1, lora1) = ranks(results, "second")
    for summary in (s0, s1):
        assert (summary["steps"], summary["reason"]) == (4, "finished")
        assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
        assert summary["cache"]["latent_misses"] == 0 and summary["cache"]["text_misses"] == 0  # resumed: all cached
    assert all(torch.equal(lora0[k], lora1[k]) for k in lora0)  # the replicas never drift

    diff = max_diff(reference, lora0)
    file_diff = max_diff(load_file(single.lora_path), load_file(run / "lora_final.safetensors"))
    print(f"max |LoRA diff| 2 ranks x batch 1 vs 1 x batch 2: {diff:.3g} (state), {file_diff:.3g} (file)")
    assert diff <= 1e-6 and file_diff <= 1e-6
    losses = [h["loss"] for h in s0["history"]]
    assert losses == pytest.approx([h["loss"] for h in single.history], abs=1e-5)  # global loss, not rank 0's

    # rank 0 alone wrote: the other rank's output_dir was never created; its caches were all hits
    assert not other_out.exists()
    (f0, _), (f1, _) = ranks(results, "first")
    assert f0["cache"]["latent_misses"] > 0 and f1["cache"]["latent_misses"] == f1["cache"]["text_misses"] == 0
    assert {"lora_final.safetensors", "training_state.json", "config.json", "checkpoint_000004"} <= \
        {p.name for p in run.iterdir()}

    # a checkpoint of 2 ranks is refused by 1 process (before any work)
    with pytest.raises(ValueError, match="trained with 2 rank"):
        t.train(config.replace(train=dataclasses.replace(config.train, output_name="other",
                                                          resume_from=str(run / "checkpoint_000002"))))
    assert not (tmp_path / "out" / "other").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_shares_cover_the_global_batch_and_weights_average_like_one_process(n):
    """Shares are contiguous, cover every sample once, and the loss weights make the mean of
    the ranks' weighted means the global batch mean (uneven and empty shares included)."""
    from trainer_core.distributed import DataParallel
    from trainer_core.types import Batch, TextBatch

    world = 3
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 1
    batch = Batch(latents=x, text=TextBatch(torch.zeros(n, 2, 4), torch.zeros(n, 3)), captions=list("abcdefgh"[:n]),
                  sources=[f"s{i}" for i in range(n)], extras={"class_text": TextBatch(torch.ones(n, 2, 4))})
    covered, weighted = [], 0.0
    for rank in range(world):
        dp = DataParallel(rank, world)
        part, x0, sigma, noise, _ = dp.shard(batch, x, torch.rand(n), x.clone(), x.clone())
        assert x0.shape[0] == sigma.shape[0] == part.latents.shape[0] == len(part.captions) >= 1
        assert part.text.context.shape[0] == part.text.pooled.shape[0] == part.extras["class_text"].context.shape[0]
        if dp.weight > 0:
            covered += part.captions
        weighted += dp.weight * float(x0.mean())
    assert covered == batch.captions
    assert weighted / world == pytest.approx(float(x.mean()))


@pytest.mark.slow  # two torchrun processes: ~30 s of CPU, mostly importing torch twice
def test_torchrun_cli_demo_stops_all_ranks_on_sigterm(tmp_path):
    """``torchrun --nproc-per-node 2 -m trainer_core demo``: the CLI joins the process group;
    SIGTERM to torchrun (forwarded to every rank) ends the run after one common step, with
    rank 0's checkpoint and LoRA of that step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer_core",
             "demo", "--steps", "500", "--output-dir", str(out), "--set", "preview.every_n_steps=0",
             "--set", "train.save_every=1", "--set", "train.keep_checkpoints=0"],
            env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not list(out.glob("demo/checkpoint_*/COMPLETE")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    log_text = (tmp_path / "log.txt").read_text(errors="replace")
    run = out / "demo"
    state = json.loads((run / "training_state.json").read_text())
    assert state["status"] == "stopped", log_text[-3000:]
    step = state["step"]
    assert 1 <= step < 500 and log_text.count("stop requested (SIGTERM)") == 2  # both ranks got it
    done = sorted(p.name for p in run.glob("checkpoint_*") if (p / "COMPLETE").is_file())
    assert done[-1] == f"checkpoint_{step:06d}"
    assert json.loads((run / done[-1] / "training_state.json").read_text())["distributed"] == {"world_size": 2}
    from safetensors import safe_open

    with safe_open(str(run / "lora_final.safetensors"), framework="pt") as f:
        assert f.metadata()["flowtrain.steps"] == str(step)
    assert (run / "samples.png").is_file() and "data parallel: 2 ranks (gloo)" in log_text


def test_ctrl_c_delivered_twice_at_once_is_one_stop_request_and_a_later_one_aborts(monkeypatch):
    """Under torchrun a Ctrl+C reaches each rank from the terminal and again from torchrun:
    that must ask for a clean stop, not abort; a second press after the grace time aborts."""
    from trainer_core.cli import StopFlag

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = StopFlag()
        stop.install()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        monkeypatch.setattr(StopFlag, "GRACE_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs between bytecodes of this thread
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
