"""benchmarks/gpu_scale.py --toy: the GPU benchmark's code path (random real-layout model
through ComfyUI's loader, Trainer bridge with memory budgets and streaming, ComfyUI's own
Train LoRA node) on the CPU with tiny shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_scale_toy_runs_every_row(tmp_path):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set")
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # -30 GB maps below "every block streamed": a refused row, which must not stop the table;
    # the packages a device may lack (PyAV, SciPy, Pillow, torchsde, torchvision, torchaudio) are placeholders
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--toy", "--models", "toy-flux2",
                           "--budgets", "none,8,-30", "--steps", "1", "--warmup", "1", "--builtin", "--json", str(out),
                           "--placeholders", "av,scipy,PIL,torchsde,torchvision,torchaudio"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    refused = rows.pop(2)
    assert refused["plan"].startswith("error: ") and "s_it" not in refused, refused
    assert [r["budget_gb"] == "none" for r in rows] == [True, False, True, True]
    assert all(r.get("s_it", 0) > 0 for r in rows), rows
    ours = rows[:2]
    assert "0 of 5 blocks streamed" in ours[0]["plan"]
    assert "blocks streamed, block checkpointing" in ours[1]["plan"] and not ours[1]["plan"].startswith("0 of")
    assert ours[1]["ledger_gb"] is not None and ours[1]["ledger_gb"] <= float(ours[1]["budget_gb"])
    assert [r["plan"] for r in rows[2:]] == ["built-in node, offloading off", "built-in node, offloading on"]
    assert "s/it" in proc.stdout and "est/meas" in proc.stdout


def test_gpu_scale_plans_name_known_models_and_fit_the_time_limit():
    """The full and quick plans run real shapes only, the quick plan is a subset-sized run,
    and rows are guarded (each is a (model, weights, resolution, budgets, builtin) tuple)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_scale

    from trainer_core import memory

    for name, rows in gpu_scale.PLANS.items():
        assert rows, name
        for model, weights, resolution, budgets, builtin in rows:
            assert model in memory.KNOWN_SHAPES and weights in ("bf16", "fp8") and resolution in (512, 1024)
            assert all(b is None or b > 0 for b in budgets) and isinstance(builtin, bool)
    quick = sum(len(r[3]) + 2 * r[4] for r in gpu_scale.PLANS["quick"])
    full = sum(len(r[3]) + 2 * r[4] for r in gpu_scale.PLANS["full"])
    assert quick < full <= 30
