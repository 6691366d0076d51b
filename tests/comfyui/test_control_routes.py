"""The Trainer node's buttons over HTTP, on a real ComfyUI server (its own main.py on a free
localhost port, ``server_harness``): one tiny FLUX.1-dev training queued through ``/prompt``
and driven through ``/flowtrain/control/<node id>`` and ``/flowtrain/state/<node id>``:

* bad requests (unknown or path-like id, bad action, bad JSON, wrong method) get a 4xx JSON
  error and leave the run as it was (no control file, still running);
* save now writes a complete checkpoint and training goes on;
* pause holds the step counter (and saves), resume continues;
* stop ends the node normally: the LoRA of the steps done, and the nodes after it ran.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import json
import time

import pytest
from safetensors import safe_open

from workflow_harness import comfy_path, nodes_of

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from server_harness import start_server, training_graph  # noqa: E402

STEPS = 100000  # never reached: the test stops the run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("comfy_http"), comfy_path())
    yield s
    s.stop()


def wait_until(server, node: str, check, timeout: float = 120) -> dict:
    """Poll the state route until ``check(state)``; returns that state."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        status, last = server.get(f"/flowtrain/state/{node}")
        if status == 200 and check(last):
            return last
        server.check_alive()
        time.sleep(0.1)
    raise AssertionError(f"state never matched; last {last}; log:\n{server.log_tail()}")


def control(server, node: str, action: str) -> tuple[int, dict]:
    return server.post(f"/flowtrain/control/{node}", {"action": action})


def steps_of(path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["flowtrain.steps"])


def test_buttons_over_http_pause_save_resume_stop_and_refusals(server):
    graph = training_graph(server, "http_controls", STEPS)
    trainer, save_lora = nodes_of(graph, "FlowTrainTrainer")[0], nodes_of(graph, "FlowTrainSaveLora")[0]
    run_dir = server.root / "output" / "flowtrain" / "http_controls"
    assert server.get(f"/flowtrain/state/{trainer}")[0] == 404  # nothing is training yet
    assert control(server, trainer, "pause")[0] == 404
    prompt_id = server.queue(graph)
    state = wait_until(server, trainer, lambda s: s["state"] == "running" and s["step"] >= 2)
    assert state["total"] == STEPS and state["s_per_it"] > 0 and state["eta"] > 0
    assert [p[0] for p in state["losses"]][:2] == [1, 2]  # the chart's history, for a reloaded page

    # refused, with a JSON error, and nothing changes
    bad = {
        "unknown id": server.post("/flowtrain/control/999", {"action": "pause"}),
        "path-like id": server.post("/flowtrain/control/..%2F..%2Ftmp", {"action": "stop"}),
        "absolute path id": server.post("/flowtrain/control/%2Ftmp", {"action": "stop"}),
        "bad action": control(server, trainer, "explode"),
        "resume when running": control(server, trainer, "resume"),
        "no action": server.post(f"/flowtrain/control/{trainer}", {"path": str(run_dir)}),
        "bad JSON": server.post(f"/flowtrain/control/{trainer}", raw=b"{pause"),
        "JSON not an object": server.post(f"/flowtrain/control/{trainer}", ["stop"]),
        "GET on control": server.get(f"/flowtrain/control/{trainer}"),
        "POST on state": server.post(f"/flowtrain/state/{trainer}", {"action": "stop"}),
        "path-like state": server.get("/flowtrain/state/..%2Fx"),
    }
    codes = {k: v[0] for k, v in bad.items()}
    print("refusals:", json.dumps(codes))
    assert codes == {"unknown id": 404, "path-like id": 400, "absolute path id": 400, "bad action": 400,
                     "resume when running": 409, "no action": 400, "bad JSON": 400, "JSON not an object": 400,
                     "GET on control": 405, "POST on state": 405, "path-like state": 400}
    assert all(isinstance(v[1], dict) and v[1]["error"] for v in bad.values())
    assert not any((run_dir / f).exists() for f in (".pause", ".stop", ".checkpoint"))
    before = wait_until(server, trainer, lambda s: True)["step"]
    after = wait_until(server, trainer, lambda s: s["step"] > before + 1)
    assert after["state"] == "running"

    # save now: a complete checkpoint, and training goes on
    status, out = control(server, trainer, "save")
    assert status == 200 and out["state"] == "saving"
    t0 = time.monotonic()
    wait_until(server, trainer, lambda s: any((run_dir / d.name / "COMPLETE").is_file()
                                              for d in run_dir.glob("checkpoint_*")))
    saved = sorted(run_dir.glob("checkpoint_*/COMPLETE"))[0].parent
    saved_step = int(saved.name.split("_")[1])
    print(f"save now: checkpoint at step {saved_step} after {time.monotonic() - t0:.2f}s")
    assert {p.name for p in saved.iterdir()} >= {"lora.safetensors", "optimizer_state.safetensors",
                                                 "training_state.json", "COMPLETE"}
    wait_until(server, trainer, lambda s: s["step"] > saved_step + 1 and s["state"] == "running")

    # pause holds the step counter
    asked = wait_until(server, trainer, lambda s: True)["step"]
    t0 = time.monotonic()
    status, out = control(server, trainer, "pause")
    assert status == 200 and out["state"] == "pausing"
    paused = wait_until(server, trainer, lambda s: s["state"] == "paused")
    print(f"pause: took effect {paused['step'] - asked} step(s) / {time.monotonic() - t0:.2f}s after the request")
    assert control(server, trainer, "pause")[0] == 409  # already paused
    time.sleep(2.5)
    held = wait_until(server, trainer, lambda s: True)
    assert (held["state"], held["step"]) == ("paused", paused["step"])
    assert (run_dir / f"checkpoint_{paused['step']:06d}" / "COMPLETE").is_file()  # a pause saves

    # resume continues
    t0 = time.monotonic()
    assert control(server, trainer, "resume")[0] == 200
    resumed = wait_until(server, trainer, lambda s: s["step"] > paused["step"] and s["state"] == "running")
    print(f"resume: training again {time.monotonic() - t0:.2f}s after the request")
    assert resumed["step"] > paused["step"]

    # stop: the node ends normally, with the LoRA so far, and the graph goes on
    status, out = control(server, trainer, "stop")
    assert status == 200 and out["state"] == "stopping"
    assert control(server, trainer, "save")[0] == 409  # nothing more once stopping
    done = server.wait_for_history(prompt_id)
    assert done["status"]["status_str"] == "success", done["status"]
    final = run_dir / "lora_final.safetensors"
    stopped_at = steps_of(final)
    assert resumed["step"] <= stopped_at < STEPS
    assert done["outputs"][save_lora]["text"]  # FlowTrain Save LoRA ran on the Trainer's output
    state_file = json.loads((run_dir / "training_state.json").read_text())
    assert (state_file["status"], state_file["step"]) == ("stopped (.stop file)", stopped_at)
    assert not any((run_dir / f).exists() for f in (".pause", ".stop", ".checkpoint"))
    assert server.get(f"/flowtrain/state/{trainer}")[0] == 404  # the run is over: nothing to control
    assert control(server, trainer, "pause")[0] == 404
