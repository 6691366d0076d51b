"""Real-size LoRA training under memory budgets on one GPU: FLUX.1-dev, Klein 9B, FLUX.2-dev.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_scale.py            # the full plan (< 8 min, H200)
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_scale.py --quick    # the short plan (~4 min)
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_scale.py --toy      # same code path, CPU, seconds

The rows run are a plan (``PLANS``: model, weights, resolution, budgets, built-in node or
not), "full" by default, "quick" with ``--quick``; ``--models``/``--weights``/
``--resolutions``/``--budgets`` instead run every combination of the given lists. For each
model, random weights with the real layer shapes are made directly
on the GPU (``torch.empty(...).normal_``), loaded through ComfyUI's loader
(``comfy.sd.load_diffusion_model_state_dict`` with ``dtype`` bf16 or fp8_e4m3fn, like
UNETLoader), and trained through the Trainer's own path (``nodes/bridge.training_model``
with a ``TrainingConfig`` whose ``memory`` section sets the budget → memory plan → streaming)
for ``--steps`` steps at each resolution (``--resolutions``), rank 16, batch 1: unconstrained
and under emulated budgets (``--budgets``; ``torch.cuda.set_per_process_memory_fraction``).
With ``--builtin`` ComfyUI's own Train LoRA node runs on the same model (offloading off and
on). Each row prints s/it (median after ``--warmup``), peak allocated GPU memory, the
estimate and estimate/measured, and MFU (3 × forward matmul+attention FLOPs per step over
``--peak-tflops``). ``--toy`` uses tiny shapes on the CPU (no peak memory there).
``--time-limit`` skips the rows left once that many seconds have passed. A row (or a model
load) that fails prints ``error: ...`` in its plan column and the table goes on.
``--compile`` is the Trainer's ``train.compile`` ("auto": compiled blocks on CUDA with
Triton; the warmup steps absorb the compile time).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_scale")
# plan name -> rows (model, weights, resolution, budgets in GB (None = unconstrained), built-in node rows)
PLANS = {
    "full": [
        ("flux1-dev", "bf16", 512, (None, 8, 12, 16, 24), True),
        ("flux1-dev", "bf16", 1024, (None, 8, 16, 24), True),
        ("flux1-dev", "fp8", 512, (None, 8), False),
        ("klein-9b", "bf16", 1024, (None, 12, 16), False),
        ("flux2-dev", "fp8", 1024, (None, 16, 24), False),
        ("flux2-dev", "bf16", 1024, (24,), False),
    ],
    "quick": [
        ("flux1-dev", "bf16", 512, (None, 8), True),
        ("flux1-dev", "bf16", 1024, (None,), False),
        ("klein-9b", "bf16", 1024, (12,), False),
        ("flux2-dev", "fp8", 1024, (24,), False),
    ],
}
TOY_SHAPES = {  # name: (arch, hidden, double, single, context, guidance)
    "toy-flux1": ("flux1", 256, 2, 3, 64, True),
    "toy-flux2": ("flux2", 256, 2, 3, 64, False),
}


def init_comfyui(comfy_path: str, cpu: bool, placeholders: tuple[str, ...] = ()):
    """Import ComfyUI from ``comfy_path`` (no nodes, no server), classic model loading.
    Packages ComfyUI imports but this script never calls get placeholders where missing
    (``device_imports``; ``placeholders`` forces them, e.g. to test without them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import device_imports

    device_imports.install(force=placeholders)
    sys.path.insert(0, str(Path(comfy_path).resolve()))
    try:
        import comfyui_tv_shim  # a dev-venv shim for CPU torch + CUDA torchvision; optional
        comfyui_tv_shim.install()
    except ImportError:
        pass
    from comfy.cli_args import args

    args.cpu = cpu
    args.disable_dynamic_vram = True
    import comfy.model_management  # noqa: F401  (reads args here)
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    import harness  # loads the pack's nodes/bridge by path (the name ``nodes`` is ComfyUI's)

    return harness.load_bridge()


def model_shape(name: str):
    from trainer_core import memory

    if name in TOY_SHAPES:
        arch, hidden, double, single, context, guidance = TOY_SHAPES[name]
        return memory.flux_shape(name, arch, hidden, double, single, context, guidance=guidance), context, guidance
    arch, hidden, double, single, context, guidance = memory.KNOWN_SHAPES[name]
    return memory.known_shape(name), context, guidance


def random_state_dict(shape, context: int, guidance: bool, device, dtype, std: float = 0.02) -> dict:
    """Every weight of ComfyUI's FLUX module for ``shape`` (BFL names), N(0, std²), made on ``device``."""
    import torch

    h, v1 = shape.hidden, shape.arch == "flux1"
    sd = {}

    def lin(name, out_f, in_f, bias):
        sd[f"{name}.weight"] = torch.empty(out_f, in_f, device=device, dtype=dtype).normal_(0, std)
        if bias:
            sd[f"{name}.bias"] = torch.empty(out_f, device=device, dtype=dtype).normal_(0, std)

    def norms(prefix):
        for n in ("query_norm", "key_norm"):
            sd[f"{prefix}.norm.{n}.scale"] = torch.ones(128, device=device, dtype=dtype)

    in_ch = 64 if v1 else 128
    lin("img_in", h, in_ch, v1)
    lin("time_in.in_layer", h, 256, v1)
    lin("time_in.out_layer", h, h, v1)
    if guidance:
        lin("guidance_in.in_layer", h, 256, v1)
        lin("guidance_in.out_layer", h, h, v1)
    if v1:
        lin("vector_in.in_layer", h, 768, True)
        lin("vector_in.out_layer", h, h, True)
    else:
        lin("double_stream_modulation_img.lin", 6 * h, h, False)
        lin("double_stream_modulation_txt.lin", 6 * h, h, False)
        lin("single_stream_modulation.lin", 3 * h, h, False)
    lin("txt_in", h, context, v1)
    for i in range(shape.double_blocks):
        for layer in shape.double_linears:
            lin(f"double_blocks.{i}.{layer.name}", layer.out_features, layer.in_features, layer.bias)
        norms(f"double_blocks.{i}.img_attn")
        norms(f"double_blocks.{i}.txt_attn")
    for i in range(shape.single_blocks):
        for layer in shape.single_linears:
            lin(f"single_blocks.{i}.{layer.name}", layer.out_features, layer.in_features, layer.bias)
        norms(f"single_blocks.{i}")
    lin("final_layer.linear", in_ch, h, v1)
    lin("final_layer.adaLN_modulation.1", 2 * h, h, v1)
    return sd


def forward_flops(shape, image_tokens: int, text_tokens: int) -> float:
    """Matmul + attention FLOPs of one forward for one sample."""
    t = image_tokens + text_tokens
    double = sum(2 * lin.in_features * lin.out_features for lin in shape.double_linears if lin.per_token) / 2 * t
    single = sum(2 * lin.in_features * lin.out_features for lin in shape.single_linears if lin.per_token) * t
    attention = 4 * t * t * shape.hidden
    return shape.double_blocks * (double + attention) + shape.single_blocks * (single + attention)


def _batch(shape, context: int, resolution: int, device, seed: int):
    import torch

    from trainer_core.types import TextBatch

    g = torch.Generator().manual_seed(seed)
    c, side = (16, resolution // 8) if shape.arch == "flux1" else (128, resolution // 16)
    x0 = torch.randn(1, c, side, side, generator=g)
    text = TextBatch(torch.randn(1, shape.text_tokens, context, generator=g),
                     torch.randn(1, 768, generator=g) if shape.arch == "flux1" else None)
    return x0, text


def run_ours(bridge, mp, shape, context: int, resolution: int, budget_gb, args) -> dict:
    import torch

    from trainer_core.config import LoRAConfig, MemoryConfig, TrainingConfig
    from trainer_core.flow import interpolate, velocity_target
    from trainer_core.lora.network import LoraNetwork
    from trainer_core.models.common import resolve_compile

    memory = MemoryConfig() if budget_gb is None else MemoryConfig(budget_gb=budget_gb, margin_gb=args.margin)
    config = TrainingConfig(memory=memory).replace(lora=LoRAConfig(rank=16, alpha=16.0, targets="attention"))
    config = config.replace(data=config.data.__class__(buckets=config.data.buckets.__class__(resolutions=(resolution,))))
    x0, text = _batch(shape, context, resolution, "cpu", 0)
    times, losses = [], []
    config = config.replace(train=dataclasses.replace(config.train, gradient_checkpointing="auto", precision="bf16"))
    with bridge.training_model(mp, config) as model:
        plan = model.memory_plan
        net = LoraNetwork.inject(model.module, config.lora, model.default_targets["attention"])
        model.apply_memory_plan(plan)
        model.set_compile(resolve_compile(args.compile, model.device), fallback=args.compile == "auto")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        for _ in range(args.warmup + args.steps):
            _sync()
            t0 = time.perf_counter()
            sigma = torch.rand(1, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            v = model.velocity(interpolate(x0, noise, sigma), sigma, text, 1.0)
            loss = torch.nn.functional.mse_loss(v, velocity_target(x0, noise).to(v.device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        ledger = model.streamer.ledger.peak if model.streamer is not None else None
        compiled = model.compile_blocks
        net.remove()
    return {"plan": plan.summary() + (", compiled" if compiled else ""), "s_it": statistics.median(times[args.warmup:]), "est_gb": plan.estimate.total / 2**30,
            "ledger_gb": None if ledger is None else ledger / 2**30, "loss": [losses[0], losses[-1]]}


def run_builtin(mp, shape, context: int, resolution: int, offloading: bool, args) -> dict:
    import torch
    import comfy_extras.nodes_train as nt
    from comfy.weight_adapter import adapter_maps

    stamps: list[float] = []
    create = nt._create_optimizer

    def timed(name, params, lr):
        opt = create(name, list(params), lr)
        opt.register_step_post_hook(lambda *a: (_sync(), stamps.append(time.perf_counter())))
        return opt

    nt._create_optimizer = timed
    x0, text = _batch(shape, context, resolution, "cpu", 0)
    extras = {"pooled_output": text.pooled} if text.pooled is not None else {}
    try:
        with torch.inference_mode():
            nt.TrainLoraNode.execute(
                model=[mp], latents=[{"samples": x0}], positive=[[[text.context, extras]]], batch_size=[1],
                steps=[args.warmup + args.steps], grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[16],
                optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["bf16"], lora_dtype=["bf16"],
                quantized_backward=[False], algorithm=[list(adapter_maps)[0]], gradient_checkpointing=[True],
                checkpoint_depth=[1], offloading=[offloading], existing_lora=["[None]"], bucket_mode=[False],
                bypass_mode=[True])
    finally:
        nt._create_optimizer = create
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][max(0, args.warmup - 1):]
    return {"plan": f"built-in node, offloading {'on' if offloading else 'off'}",
            "s_it": statistics.median(gaps) if gaps else float("nan"), "est_gb": None, "ledger_gb": None}


def _reload(shape, context, guidance, device, dtype, disable_dynamic=True):
    import comfy.sd
    import torch

    sd = random_state_dict(shape, context, guidance, device, torch.bfloat16)
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype}, disable_dynamic=disable_dynamic)


def toy_budgets(shape, budgets, resolution: int) -> list:
    """Toy models weigh a few MB: map 8..24 GB onto the span between "every block streamed"
    and "nothing streamed" of the toy model, so the toy rows stream too."""
    from trainer_core import memory

    run = memory.RunShape(resolution=resolution, targets="attention", casts_weights=True)
    lo = memory.estimate(shape, run, checkpoint="blocks", streamed=tuple(shape.block_names())).total
    hi = memory.estimate(shape, run, checkpoint="blocks").total
    return [None if b is None else (lo + (hi - lo) * b / 32) / 2**30 for b in budgets]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset(budget_gb) -> None:
    """Free everything ComfyUI holds and set the emulated budget for the next row."""
    import gc

    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if budget_gb is None else min(1.0, budget_gb * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()


def plan_rows(args) -> list[tuple]:
    """(model, weights, resolution, budgets, builtin) rows: the named plan, or every
    combination of the lists given on the command line (``--toy``: the toy models)."""
    custom = any(x is not None for x in (args.models, args.weights, args.resolutions, args.budgets))
    if not custom and not args.toy:
        return PLANS["quick" if args.quick else "full"]
    models = (args.models or ("toy-flux1,toy-flux2" if args.toy else "flux1-dev,klein-9b,flux2-dev")).split(",")
    resolutions = [int(r) for r in (args.resolutions or ("128" if args.toy else "512,1024")).split(",")]
    budgets = tuple(None if b == "none" else float(b) for b in (args.budgets or "none,8,12,16,24").split(","))
    return [(m, w, r, budgets, args.builtin) for m in models for w in (args.weights or "bf16").split(",")
            for r in resolutions]


def _error(e: BaseException) -> str:
    log.debug("row failed", exc_info=e)
    first = (str(e).splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first}"[:120]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny shapes on the CPU: the same code path in seconds")
    p.add_argument("--quick", action="store_true", help="the short plan (~4 min on an H200) instead of the full one")
    p.add_argument("--models", default=None, help="comma list (flux1-dev, klein-9b, flux2-dev; toy: toy-flux1, toy-flux2)")
    p.add_argument("--weights", default=None, help="comma list of bf16, fp8 (with --models etc.; default bf16)")
    p.add_argument("--resolutions", default=None, help="comma list (default 512,1024; toy 128)")
    p.add_argument("--budgets", default=None, help="comma list of GB; none = unconstrained (default none,8,12,16,24)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 8; quick 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--margin", type=float, default=0.5, help="memory.margin_gb for budget rows")
    p.add_argument("--builtin", action="store_true", help="with --models etc.: also ComfyUI's Train LoRA node")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="train.compile for our rows")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H200: 989)")
    p.add_argument("--time-limit", type=float, default=450.0, help="skip rows once this many seconds have passed")
    p.add_argument("--json", type=Path, help="write the rows here as JSON (also after each row)")
    p.add_argument("--placeholders", default="", help="comma list of optional packages (device_imports.OPTIONAL) to "
                   "replace by placeholders even if installed: proves the run needs none of them")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (5 if args.quick else 8)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    bridge = init_comfyui(comfy_path, cpu=args.toy, placeholders=tuple(filter(None, args.placeholders.split(","))))
    import torch

    device = "cpu" if args.toy else "cuda"
    start, rows = time.perf_counter(), []
    print(f"{'model':<12}{'weights':<8}{'res':>6} {'budget':>9}  {'plan':<62}{'s/it':>8}{'peak GB':>9}"
          f"{'est GB':>8}{'est/meas':>9}{'MFU':>7}", flush=True)
    loaded, mp = None, None
    for name, weights, resolution, budgets, builtin in plan_rows(args):
        base = {"model": name, "weights": weights, "resolution": resolution}
        try:
            shape, context, guidance = model_shape(name)
            if loaded != (name, weights):
                mp, loaded = None, None
                _reset(None)
                mp = load_random_model(shape, context, guidance, device, weights)
                loaded = (name, weights)
        except Exception as e:  # a model that cannot be built: one error row, the table goes on
            rows.append({**base, "budget_gb": "-", "plan": _error(e)})
            _print(rows[-1])
            continue
        row_budgets = toy_budgets(shape, budgets, resolution) if args.toy else budgets
        if args.toy:
            args.margin = 0.0
        jobs = [("ours", b) for b in row_budgets] + ([("builtin", False), ("builtin", True)] if builtin else [])
        for kind, arg in jobs:
            label = "none" if (kind == "builtin" or arg is None) else f"{arg:.3g}"
            row = {**base, "budget_gb": label}
            if time.perf_counter() - start > args.time_limit:
                row.update(plan="skipped (time limit)")
            else:
                row.update(run_row(bridge, mp, shape, context, resolution, kind, arg, args))
            rows.append(row)
            _print(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    mp = None
    _reset(None)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def load_random_model(shape, context: int, guidance: bool, device, weights: str):
    """A ComfyUI MODEL (classic patcher) of random weights with ``shape``'s layers, in ``weights``."""
    import comfy.sd
    import torch

    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[weights]
    sd = random_state_dict(shape, context, guidance, device, torch.bfloat16)
    mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype}, disable_dynamic=True)
    del sd
    # the built-in node re-creates its model through this (random weights again: same shapes)
    mp.cached_patcher_init = (_reload, (shape, context, guidance, device, dtype))
    return mp


def run_row(bridge, mp, shape, context: int, resolution: int, kind: str, arg, args) -> dict:
    """One row's figures, or ``plan="error: ..."``: any failure stays in its row."""
    import torch

    out: dict = {}
    _reset(arg if kind == "ours" else None)
    try:
        out.update(run_ours(bridge, mp, shape, context, resolution, arg, args) if kind == "ours"
                   else run_builtin(mp, shape, context, resolution, arg, args))
    except Exception as e:  # OOM, a refused plan, a ComfyUI error: reported in the row
        out["plan"] = _error(e)
    if _cuda():
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if "s_it" in out and not args.toy:
        tokens = shape.image_tokens(resolution)
        out["mfu"] = 3 * forward_flops(shape, tokens, shape.text_tokens) / out["s_it"] / (args.peak_tflops * 1e12)
    return out


def _print(row: dict) -> None:
    f = lambda key, fmt: (fmt % row[key]) if row.get(key) is not None else "-"  # noqa: E731
    ratio = "%.2f" % (row["est_gb"] / row["peak_gb"]) if row.get("est_gb") and row.get("peak_gb") else "-"
    mfu = "%.0f%%" % (100 * row["mfu"]) if row.get("mfu") is not None else "-"
    print(f"{row['model']:<12}{row['weights']:<8}{row['resolution']:>6} {row['budget_gb']:>9}  {row.get('plan', ''):<62.62}"
          f"{f('s_it', '%.3f'):>8}{f('peak_gb', '%.2f'):>9}{f('est_gb', '%.2f'):>8}{ratio:>9}{mfu:>7}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
