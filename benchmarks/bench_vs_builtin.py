"""FlowTrain's trainer vs ComfyUI's built-in "Train LoRA" node, on the same model file.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_vs_builtin.py --steps 10

Writes a random FLUX.1-dev-layout file (hidden 3072, 1 double + 1 single block, real
context/pooled widths 4096/768: ~546 M parameters, bf16) to a temp folder, then runs each
trainer in its own subprocess (so peak RSS is per trainer), all on bf16 weights loaded with
``comfy.sd.load_diffusion_model(path, {"dtype": bf16})`` inside ``torch.inference_mode``
(what UNETLoader does in a prompt), batch 1, LoRA rank 16 on EVERY linear layer for both
trainers (the built-in node also trains bias and norm offsets, which are elementwise). Cases
(``--cases``):

* ``512``: a 512² image, 16×64×64 latent = 1024 image tokens + 512 text tokens (realistic);
* ``mem``: a 64 px image, 16 image tokens + 8 text tokens: a memory-bound case (weights are
  read far more often than they are multiplied), kept to show per-step overheads.

Workers:

* ``ours:<mode>``: ``nodes/bridge.training_model`` → ``BflFlux`` + ``LoraNetwork``
  (rank 16, alpha 16, fp32 LoRA master weights computing in bf16, every linear layer,
  AdamW from ``trainer_core.optim``) for checkpoint mode off / blocks / selective at bf16,
  and ``ours:defaults``: the Trainer node's defaults (checkpointing "auto", precision "auto").
* ``builtin:defaults``: ``TrainLoraNode.execute`` with its defaults (bf16, LoRA on every
  layer, per-module checkpointing, weight-merge adapters), rank 16.
* ``builtin:best``: the same with ``bypass_mode=True``.
* ``floor``: the machine's bf16 matrix-multiply floor for one step: every matmul a
  LoRA step needs at minimum (per linear layer: forward, grad-input where the input needs a
  gradient, the LoRA's two forward and four backward matmuls; per block: attention's two
  forward and four backward batched matmuls; no recompute), each timed with ``torch.matmul``
  in bf16 at its exact shape on this machine, summed. Layer shapes and token counts come from
  a real forward of the model (hooks on every linear layer).

Seconds per step are the median over the steps after ``--warmup`` (built-in: time between
optimizer steps, via an optimizer step hook); peak RSS is the worker's ``ru_maxrss``;
"floor share" = floor seconds / step seconds (1.0 = nothing but bf16 matmuls at full speed;
checkpointed modes also recompute the forward, which the floor does not count).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
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
WORKERS = ("floor", "ours:off", "ours:blocks", "builtin:best", "ours:defaults", "ours:selective", "builtin:defaults")
DEFAULT_WORKERS = ("floor", "ours:off", "ours:blocks", "builtin:best")
CASES = {  # name: (latent side, text tokens, label)
    "512": (64, 512, "512² = 1024 image + 512 text tokens"),
    "mem": (8, 8, "memory-bound: 16 image + 8 text tokens (the matmul floor is no bound here: "
                  "weight reads dominate, and timing each matmul alone re-reads every weight cold)"),
}
COMPUTE_BOUND = {"512"}  # cases where the floor share means something
RANK = 16


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _setup(comfy_path: str):
    import harness

    harness.init_comfyui(comfy_path)
    return harness


def _data(case: str, seed: int = 0):
    import torch

    side, text_tokens, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, side, side, generator=g)
    context = torch.randn(1, text_tokens, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return latents, context, pooled


def _bridge(comfy_path: str):
    harness = _setup(comfy_path)
    return harness, harness.load_bridge()


LORA_KW = {  # LoRA on every linear layer
    "rank": RANK, "alpha": float(RANK), "targets": "custom", "target_regex": ".*"}


def run_ours(model_path: str, mode: str, steps: int, warmup: int, case: str, comfy_path: str) -> dict:
    import torch

    harness, bridge = _bridge(comfy_path)
    from trainer_core.config import LoRAConfig, OptimConfig
    from trainer_core.flow import interpolate, velocity_target
    from trainer_core.lora.network import LoraNetwork
    from trainer_core.optim import build_optimizer, grad_norm_clip
    from trainer_core.types import TextBatch

    latents, context, pooled = _data(case)
    text = TextBatch(context, pooled)
    mp = harness.load_flux(model_path, dtype=torch.bfloat16)
    times, losses = [], []
    # "defaults" is what the Trainer node does out of the box: checkpointing and precision "auto"
    checkpointing, precision = ("auto", "auto") if mode == "defaults" else (mode, "bf16")
    with bridge.training_model(mp, gradient_checkpointing=checkpointing, precision=precision) as model:
        cfg = LoRAConfig(**LORA_KW)  # fp32 LoRA weights (our default), every linear layer
        net = LoraNetwork.inject(model.module, cfg, cfg.target_regex)
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


def run_builtin(model_path: str, variant: str, steps: int, warmup: int, case: str, comfy_path: str) -> dict:
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
    latents, context, pooled = _data(case)
    with torch.inference_mode():
        mp = harness.load_flux(model_path, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        out = nt.TrainLoraNode.execute(
            model=[mp], latents=[{"samples": latents}], positive=[[[context, {"pooled_output": pooled}]]],
            batch_size=[1], steps=[warmup + steps], grad_accumulation_steps=[1], learning_rate=[5e-4], rank=[RANK],
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


def _time_matmul(a_shape, b_shape, reps: int) -> float:
    """Median seconds of one bf16 ``torch.matmul`` of random operands of these shapes."""
    import torch

    a = torch.randn(a_shape, dtype=torch.bfloat16)
    b = torch.randn(b_shape, dtype=torch.bfloat16)
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_matmuls(layers: list[tuple[int, int, int, bool]], attention: list[tuple[int, int, int]], rank: int) -> list:
    """Every matmul of a minimal LoRA training step, as ((M, K), (K, N)) or batched shapes.

    ``layers``: (tokens T, in, out, input needs grad) per linear layer; ``attention``:
    (heads, tokens, head dim) per attention call."""
    mms = []
    for t, i, o, grad_in in layers:
        mms.append(((t, i), (i, o)))            # base forward
        if grad_in:
            mms.append(((t, o), (o, i)))        # base grad-input (frozen base: no weight grad)
            mms.append(((t, rank), (rank, i)))  # LoRA grad-input through A
        mms += [((t, i), (i, rank)), ((t, rank), (rank, o)),   # LoRA forward: x·Aᵀ, h·Bᵀ
                ((t, o), (o, rank)),                           # grad h = g·B
                ((o, t), (t, rank)), ((rank, t), (t, i))]      # grad B = gᵀ·h, grad A = ghᵀ·x
    for h, t, d in attention:
        mms += [((h, t, d), (h, d, t)), ((h, t, t), (h, t, d))]    # S = QKᵀ, O = PV
        mms += [((h, t, d), (h, d, t)), ((h, t, t), (h, t, d)),    # dP = dO·Vᵀ, dV = Pᵀ·dO
                ((h, t, t), (h, t, d)), ((h, t, t), (h, t, d))]    # dQ = dS·K, dK = dSᵀ·Q
    return mms


def run_floor(model_path: str, variant: str, steps: int, warmup: int, case: str, comfy_path: str) -> dict:
    import torch

    harness, bridge = _bridge(comfy_path)
    from trainer_core.config import LoRAConfig
    from trainer_core.lora.network import LoraNetwork, is_linear
    from trainer_core.types import TextBatch

    latents, context, pooled = _data(case)
    mp = harness.load_flux(model_path, dtype=torch.bfloat16)
    layers = []
    with bridge.training_model(mp, gradient_checkpointing="off", precision="bf16") as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(**LORA_KW), LORA_KW["target_regex"])
        hooks = []
        for name, m in model.module.named_modules():
            if is_linear(m) and not hasattr(m, "base_layer"):
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out: layers.append((args[0].numel() // mod.in_features, mod.in_features,
                                                          mod.out_features, args[0].requires_grad))))
        try:
            model.velocity(latents, torch.full((1,), 0.5), TextBatch(context, pooled), 1.0)
        finally:
            for h in hooks:
                h.remove()
            net.remove()
        # one joint attention per block over all tokens, head dim 128
        hidden = model.module.img_in.weight.shape[0]
        tokens = model.image_tokens(tuple(latents.shape[-2:])) + context.shape[1]
        blocks = len(model.module.double_blocks) + len(model.module.single_blocks)
        attention = [(hidden // 128, tokens, 128)] * blocks
    mms = step_matmuls(layers, attention, RANK)
    flops = sum(2 * math.prod(a) * b[-1] for a, b in mms)
    cache: dict = {}
    seconds = 0.0
    for a, b in mms:
        if (a, b) not in cache:
            cache[(a, b)] = _time_matmul(a, b, reps=max(3, steps))
        seconds += cache[(a, b)]
    return {"s_per_step": seconds, "peak_rss_gb": peak_rss_gb(), "lora_params": None, "loss_first_last": None,
            "flops": flops, "matmuls": len(mms), "attention_calls": len(attention), "linear_calls": len(layers)}


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
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--builtin-default-steps", type=int, default=2,
                    help="timed steps for the slow built-in defaults")
    ap.add_argument("--cases", default="512,mem", help=f"comma list of {list(CASES)}")
    ap.add_argument("--only", default=",".join(DEFAULT_WORKERS), help=f"comma list of {WORKERS}")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not a.comfyui:
        ap.error("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if a.worker:
        kind, _, variant = a.worker.partition(":")
        fn = {"ours": run_ours, "builtin": run_builtin, "floor": run_floor}[kind]
        steps = a.builtin_default_steps if a.worker == "builtin:defaults" else a.steps
        print("RESULT " + json.dumps(fn(a.model, variant, steps, a.warmup, a.case, a.comfyui)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="flowtrain_bench_") as tmp:
        model = Path(tmp) / "flux1_h3072_1x1.safetensors"
        n = write_model(model)
        print(f"model: FLUX.1-dev layout, hidden 3072, 1+1 blocks, {n / 1e6:.0f} M params (bf16); batch 1, "
              f"LoRA rank {RANK} on every linear layer; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}",
              flush=True)
        for case in a.cases.split(","):
            print(f"\ncase {case}: {CASES[case][2]}", flush=True)
            rows = {}
            for worker in a.only.split(","):
                cmd = [sys.executable, __file__, "--worker", worker, "--case", case, "--model", str(model),
                       "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--builtin-default-steps", str(a.builtin_default_steps), "--comfyui", a.comfyui]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"  {worker}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                    continue
                r = rows[worker] = json.loads(line[len("RESULT "):])
                if worker == "floor":
                    print(f"  {'bf16 matmul floor':18s} {r['s_per_step']:7.3f} s/step  ({r['flops'] / 1e12:.2f} TFLOP in "
                          f"{r['matmuls']} matmuls = {r['flops'] / r['s_per_step'] / 1e9:.0f} GFLOP/s achieved by "
                          f"torch.matmul at the step's shapes)", flush=True)
                    continue
                floor = rows.get("floor", {}).get("s_per_step")
                share = f"  floor share {floor / r['s_per_step']:5.1%}" if floor and case in COMPUTE_BOUND else ""
                print(f"  {worker:18s} {r['s_per_step']:7.3f} s/step{share}  peak RSS {r['peak_rss_gb']:5.2f} GB  "
                      f"trained params {r['lora_params'] or 0:>10,}  loss "
                      f"{r['loss_first_last'][0]:.3f}->{r['loss_first_last'][1]:.3f}", flush=True)
            best = rows.get("builtin:best", {}).get("s_per_step")
            if best:
                print("  speed-up vs built-in best (bypass, bf16 weights):")
                for w, r in rows.items():
                    if w != "floor":
                        print(f"    {w:18s} {best / r['s_per_step']:5.2f}x")


if __name__ == "__main__":
    main()
