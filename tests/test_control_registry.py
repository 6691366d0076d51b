"""The server-side registry behind the Trainer's buttons (``nodes/control_routes.py``, loaded
by path: no ComfyUI needed): only a live run named by its node id can be controlled, a refusal
changes nothing, and control files the server made that the run never acted on go with it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def routes():
    name = "flowtrain_control_routes_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "control_routes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_only_a_live_training_run_is_controlled(routes, tmp_path):
    live = routes.LiveRuns()
    assert live.act("7", "pause")[0] == 404
    with live.live("7") as run:
        status, out = live.act("7", "pause")
        assert (status, out["state"]) == (409, "starting")  # no run folder yet
        run.run_dir, run.phase = tmp_path, "encoding images"
        assert live.act("7", "stop")[0] == 409 and not list(tmp_path.iterdir())
        run.phase = "training"
        assert live.act("8", "pause")[0] == 404
        assert live.act("7", "resume")[0] == 409  # not paused: nothing changes
        assert not list(tmp_path.iterdir())
        status, out = live.act("7", "pause")
        assert (status, out["state"], out["node"]) == (200, "pausing", "7") and (tmp_path / ".pause").exists()
        run.phase = "paused"
        assert live.get("7").snapshot()["state"] == "paused"
        assert live.act("7", "resume")[0] == 200 and not (tmp_path / ".pause").exists()
        run.on_step(3, 10, {"loss": 0.5, "lr": 1e-3, "s_per_it": 0.25, "eta": 1.75})
        run.on_step(4, 10, {"loss": float("nan"), "lr": 1e-3, "s_per_it": 0.25, "eta": 1.5})
        snap = run.snapshot(history=True)
        assert snap["losses"] == [[3, 0.5], [4, None]] and (snap["step"], snap["eta"]) == (4, 1.5)
    assert live.act("7", "pause")[0] == 404 and live.get("7") is None  # ended: gone


def test_requests_the_run_never_acted_on_are_removed_when_it_ends(routes, tmp_path):
    live = routes.LiveRuns()
    (tmp_path / ".checkpoint").touch()  # the user's own file: not the server's to remove
    with live.live("3") as run:
        run.run_dir, run.phase = tmp_path, "training"
        assert live.act("3", "pause")[0] == 200
    assert not (tmp_path / ".pause").exists() and (tmp_path / ".checkpoint").exists()


def test_node_ids_are_comfyui_ids_never_paths(routes):
    good = ["7", "12:5", "1:2:3"]
    bad = ["", "../x", "/tmp", "7/..", "a", "7 ", "..", "7:", ":7", "1" * 13]
    assert all(routes.NODE_ID.fullmatch(x) for x in good)
    assert not any(routes.NODE_ID.fullmatch(x) for x in bad)
