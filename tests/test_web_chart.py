"""The live chart (web/flowtrain.js) under node.js with stub ComfyUI modules and DOM
(``tests/web/chart_harness.mjs``): the node's readout follows the run's phase events."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readouts(events: list[tuple[str, dict]]) -> list[str]:
    """The chart's text line after each event (all sent to node "7", a Trainer)."""
    lines = "\n".join(json.dumps([name, {"node": "7", **data}]) for name, data in events)
    done = subprocess.run(["node", str(ROOT / "tests" / "web" / "chart_harness.mjs"), str(ROOT / "web" / "flowtrain.js")],
                          input=lines, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def phase(name: str, n: int = 0, total: int = 0, rate=None, eta=None) -> tuple[str, dict]:
    return "flowtrain.phase", {"phase": name, "n": n, "total": total, "rate": rate, "eta": eta}


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js is not installed")
def test_chart_shows_the_phase_counts_and_steps():
    step = ("flowtrain.progress", {"step": 1, "total": 10, "loss": 0.5, "lr": 0.001})
    assert readouts([phase("loading"), phase("encoding images", 4, 12, 2.0, 4.0), phase("encoding captions", 0, 3),
                     phase("training"), step, phase("saving"), phase("training"), phase("done")]) == [
        "loading", "encoding images 4/12 (2.0/s, ETA 4s)", "encoding captions 0/3", "training: first step running…",
        "step 1/10  loss 0.5000  lr 1.00e-3", "step 1/10  loss 0.5000  lr 1.00e-3  · saving…",
        "step 1/10  loss 0.5000  lr 1.00e-3", "step 1/10  loss 0.5000  lr 1.00e-3"]
