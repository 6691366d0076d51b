"""FlowTrain's trainer vs ComfyUI's built-in "Train LoRA" node, on the same model file.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_vs_builtin.py --steps 10

Writes a random FLUX.1-dev-layout file (hidden 3072, 1 double + 1 single block, real
context/pooled widths 4096/768: ~546 M parameters, bf16) to a temp folder, then runs each
trainer in its own subprocess (so peak RSS is per trainer), all on bf16 weights loaded with
``comfy.sd.load_diffusion_model(path, {"dtype": bf16})`` inside ``torch.inference_mode``
(what UNETLoader does in a prompt), batch 1, a 16×8×8 latent (64 px → 16 image tokens),
``--text-tokens`` tokens of conditioning, LoRA rank 16:

* ``ours:<mode>``: ``nodes/comfy_bridge.training_model`` → ``BflFlux`` + ``LoraNetwork``
  (our defaults: rank 16, alpha 16, fp32 LoRA weights, targets 'attention', AdamW from
  ``trainer_core.optim``) for checkpoint mode off / blocks / selective at bf16, and
  ``ours:defaults``: the Trainer node's defaults (checkpointing "auto", precision "auto").
* ``builtin:defaults``: ``TrainLoraNode.execute`` with its defaults (bf16, LoRA on every
  layer, per-module checkpointing, weight-merge adapters), rank 16.
* ``builtin:best``: the same with ``bypass_mode=True``.

Seconds per step are the median over the steps after ``--warmup`` (built-in: time between
optimizer steps, via an optimizer step hook); peak RSS is the worker's ``ru_maxrss``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))

log = logging.getLogger("bench")
WORKERS = ("ours:defaults", "ours:off", "ours:blocks", "ours:selective", "builtin:best", "builtin:defaults")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _setup(comfy_path: str):
    import harness

    harness.init_comfyui(comfy_path)
    return harness


def _data(text_tokens: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, text_tokens, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return latents, context, pooled


def run_ours(model_path: str, mode: str, steps: int, warmup: int, text_tokens: int, comfy_path: str) -> dict:
    import torch

    harness = _setup(comfy_path)
    spec = importlib.util.spec_from_file_location("flowtrain_comfy_bridge", ROOT / "nodes" / "comfy_bridge.py")
    bridge = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bridge
    spec.loader.exec_module(bridge)
    from trainer_core.config import LoRAConfig, OptimConfig
    from trainer_core.flow import interpolate, velocity_target
    from trainer_core.lora.network import LoraNetwork
    from trainer_core.optim import build_optimizer, grad_norm_clip
    from trainer_core.types import TextBatch

    latents, context, pooled = _data(text_tokens)
    text = TextBatch(context, pooled)
    mp = harness.load_flux(model_path, dtype=torch.bfloat16)
    times, losses = [], []
    # "defaults" is what the Trainer node does out of the box: checkpointing and precision "auto"
    checkpointing, precision = ("auto", "auto") if mode == "defaults" else (mode, "bf16")
    with bridge.training_model(mp, gradient_checkpointing=checkpointing, precision=precision) as model:
        cfg = LoRAConfig()  # our defaults: rank 16, alpha 16, fp32 LoRA weights, 'attention'
        net = LoraNetwork.inject(model.module, cfg, model.default_targets[cfg.targets])
        opt_cfg = OptimConfig()
        opt = build_optimizer(net, opt_cfg)
        g = torch.Generator().manual_seed(0)
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            sigma = torch.rand(1, generator=g)
            noise = torch.randn(latents.shape, generator=g)
            v = model.velocity(interpolate(latents, noise, sigma), sigma, text, 1.0)
            loss = torch.nn.functional.mse_loss(v, velocity_target(latents, noise))
            loss.backward()
            grad_norm_clip(net.parameters(), opt_cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
        trained = sum(p.numel() for p in net.parameters())
        net.remove()
    return {"s_per_step": statistics.median(times[warmup:]), "peak_rss_gb": peak_rss_gb(),
            "lora_params": trained, "loss_first_last": [losses[0], losses[-1]]}


def run_builtin(model_path: str, variant: str, steps: int, warmup: int, text_tokens: int, comfy_path: str) -> dict:
    import torch

    harness = _setup(comfy_path)
    import comfy_extras.nodes_train as nt
    from comfy.weight_adapter import adapter_maps

    stamps: list[float] = []
    counted: dict = {}
    create = nt._create_optimizer

    def timed_optimizer(name, params, lr):
        params = list(params)
        counted["lora_params"] = sum(p.numel() for p in params)
        opt = create(name, params, lr)
        opt.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
        return opt

    nt._create_optimizer = timed_optimizer
    latents, context, pooled = _data(text_tokens)
    with torch.inference_mode():
        mp = harness.load_flux(model_path, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        out = nt.TrainLoraNode.execute(
            model=[mp], latents=[{"samples": latents}], positive=[[[context, {"pooled_output": pooled}]]],
            batch_size=[1], steps=[warmup + steps], grad_accumulation_steps=[1], learning_rate=[5e-4], rank=[16],
            optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["bf16"], lora_dtype=["bf16"],
            quantized_backward=[False], algorithm=[list(adapter_maps)[0]], gradient_checkpointing=[True],
            checkpoint_depth=[1], offloading=[False], existing_lora=["[None]"], bucket_mode=[False],
            bypass_mode=[variant == "best"],
        )
    total = time.perf_counter() - t0
    losses = out.result[1]["loss"] if hasattr(out, "result") else out[1]["loss"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][max(0, warmup - 1):]
    return {"s_per_step": statistics.median(gaps) if gaps else total / (warmup + steps), "peak_rss_gb": peak_rss_gb(),
            "lora_params": counted.get("lora_params"), "loss_first_last": [losses[0], losses[-1]]}


def write_model(path: Path) -> int:
    import torch
    from safetensors.torch import save_file

    import harness

    sd = harness.flux_state_dict("flux1", guidance=True, hidden=3072, depth=1, depth_single=1, context_dim=4096,
                                 vec_dim=768, dtype=torch.bfloat16)
    save_file(sd, str(path))
    return sum(v.numel() for v in sd.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--builtin-default-steps", type=int, default=3,
                    help="timed steps for the slow built-in defaults (~8 s/step on 2 cores)")
    ap.add_argument("--text-tokens", type=int, default=8)
    ap.add_argument("--only", default=",".join(WORKERS), help=f"comma list of {WORKERS}")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not a.comfyui:
        ap.error("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if a.worker:
        kind, variant = a.worker.split(":")
        fn = run_ours if kind == "ours" else run_builtin
        steps = a.builtin_default_steps if a.worker == "builtin:defaults" else a.steps
        print("RESULT " + json.dumps(fn(a.model, variant, steps, a.warmup, a.text_tokens, a.comfyui)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="flowtrain_bench_") as tmp:
        model = Path(tmp) / "flux1_h3072_1x1.safetensors"
        n = write_model(model)
        print(f"model: FLUX.1-dev layout, hidden 3072, 1+1 blocks, {n / 1e6:.0f} M params (bf16); "
              f"latent 16x8x8 (16 image tokens), {a.text_tokens} text tokens, rank 16, torch threads "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
        rows = []
        for worker in a.only.split(","):
            cmd = [sys.executable, __file__, "--worker", worker, "--model", str(model), "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--builtin-default-steps", str(a.builtin_default_steps),
                   "--text-tokens", str(a.text_tokens), "--comfyui", a.comfyui]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{worker}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            rows.append((worker, r))
            print(f"{worker:18s} {r['s_per_step']:7.3f} s/step  peak RSS {r['peak_rss_gb']:5.2f} GB  "
                  f"LoRA params {r['lora_params'] or 0:>10,}  loss {r['loss_first_last'][0]:.3f}->{r['loss_first_last'][1]:.3f}",
                  flush=True)
        best = min((r["s_per_step"] for w, r in rows if w == "builtin:best"), default=None)
        if best:
            print("\nspeed-up vs built-in best (bypass, bf16 weights):")
            for w, r in rows:
                print(f"  {w:18s} {best / r['s_per_step']:5.2f}x")


if __name__ == "__main__":
    main()
