"""The live chart (web/flowtrain.js) under node.js with stub ComfyUI modules and DOM
(``tests/web/chart_harness.mjs``): the node's readout follows the run's phase events; the
state, s/it, ETA and the Pause/Resume, Save now and Stop buttons follow the run's state,
a click POSTs its action to the control route, and a reloaded page rebuilds the chart
from the state route."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snapshots(events: list[tuple[str, dict]]) -> list[dict]:
    """The node's readout, state, buttons and requests after each event (events go to node
    "7", a Trainer; ``@click``/``@reply``/``@load`` lines act as the harness describes)."""
    lines = "\n".join(json.dumps([name, data if name.startswith("@") else {"node": "7", **data}])
                      for name, data in events)
    done = subprocess.run(["node", str(ROOT / "tests" / "web" / "chart_harness.mjs"), str(ROOT / "web" / "flowtrain.js")],
                          input=lines, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def readouts(events: list[tuple[str, dict]]) -> list[str]:
    """The chart's text line after each event."""
    return [s["text"] for s in snapshots(events)]


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


def progress(step: int, state: str = "running", s_per_it=None, eta=None) -> tuple[str, dict]:
    return "flowtrain.progress", {"step": step, "total": 100, "loss": 0.5, "lr": 0.001, "s_per_it": s_per_it,
                                  "eta": eta, "state": state}


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js is not installed")
def test_buttons_follow_the_state_and_post_their_action():
    out = snapshots([
        ("flowtrain.phase", {"phase": "encoding images", "n": 1, "total": 3, "state": "starting"}),
        ("flowtrain.phase", {"phase": "training", "n": 0, "total": 0, "state": "running"}),
        progress(3, s_per_it=0.42, eta=97 * 0.42),
        ("@reply", {"status": 200, "body": {"node": "7", "state": "pausing"}}),
        ("@click", "pause"),
        ("flowtrain.phase", {"phase": "paused", "n": 0, "total": 0, "state": "paused"}),
        ("@reply", {"status": 409, "body": {"error": "the run is stopping", "state": "stopping"}}),
        ("@click", "stop"),
        ("flowtrain.phase", {"phase": "done", "n": 0, "total": 0, "state": "done"}),
    ])
    starting, running, _, pausing, paused, stopping, done = [out[i] for i in (0, 2, 3, 4, 5, 7, 8)]
    assert starting["shown"] and starting["state"] == "starting"
    assert all(disabled for _, disabled in starting["buttons"].values())  # nothing to control before step 1
    assert running["text"] == "step 3/100  loss 0.5000  lr 1.00e-3  2.38it/s  ETA 41s"
    assert running["buttons"] == {"pause": ["Pause", False], "save": ["Save now", False], "stop": ["Stop", False]}
    assert pausing["fetches"] == [["POST", "/flowtrain/control/7", {"action": "pause"}]]
    assert (pausing["state"], pausing["buttons"]["pause"]) == ("pausing", ["Resume", False])
    assert (paused["state"], paused["buttons"]["pause"]) == ("paused", ["Resume", False])
    assert stopping["fetches"] == [["POST", "/flowtrain/control/7", {"action": "stop"}]]
    assert stopping["state"] == "stopping" and all(d for _, d in stopping["buttons"].values())
    assert not done["shown"]  # the buttons go once the run is over


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js is not installed")
def test_a_reloaded_page_rebuilds_the_chart_and_buttons_from_the_state_route():
    state = {"node": "7", "state": "paused", "phase": "paused", "step": 2, "total": 100, "s_per_it": 3.5,
             "eta": 343.0, "lr": 0.001, "losses": [[1, 0.7], [2, 0.6]]}
    reply, loaded = snapshots([("@reply", {"status": 200, "body": state}), ("@load", {})])
    assert loaded["fetches"] == [["GET", "/flowtrain/state/7", None]]
    assert loaded["text"] == "step 2/100  loss 0.6000  lr 1.00e-3  3.50s/it  ETA 5m43s"
    assert loaded["shown"] and loaded["state"] == "paused" and loaded["buttons"]["pause"] == ["Resume", False]
    _, gone = snapshots([("@reply", {"status": 404, "body": {"error": "no run"}}), ("@load", {})])
    assert not gone["shown"]  # nothing training under that id: no buttons
