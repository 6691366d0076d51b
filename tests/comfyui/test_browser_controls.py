"""The Trainer's buttons in a real browser: headless Chromium (through playwright-core) on the
frontend a real ComfyUI server ships (``server_harness``). It loads a tiny Trainer workflow,
queues it, and clicks Pause (screenshot), reloads the page (the node shows the paused run
again), Resume, Save now and Stop (``tests/web/browser_controls.mjs``); this test checks what
the server wrote: a checkpoint per save/pause, a LoRA after the stop, the graph went on.

Skipped unless ``COMFYUI_PATH`` is set, a Chromium is installed (``CHROMIUM``, else
``chromium`` on PATH) and node.js can require ``playwright-core`` (``NODE_PATH``, e.g. a
folder where ``npm install playwright-core`` ran). ``FLOWTRAIN_SCREENSHOTS=<folder>`` keeps the
screenshots (the README's come from ``FLOWTRAIN_SCREENSHOTS=docs/images``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from workflow_harness import ROOT, comfy_path, nodes_of

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _playwright() -> bool:
    if shutil.which("node") is None:
        return False
    found = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], capture_output=True, env=os.environ)
    return found.returncode == 0


pytestmark = [
    pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (set CHROMIUM or install chromium)"),
    pytest.mark.skipif(not _playwright(), reason="node.js cannot require playwright-core (set NODE_PATH to a "
                                                 "node_modules folder holding it)"),
]

from server_harness import start_server, training_graph  # noqa: E402

STEPS = 5000  # far more than the tiny model trains while the browser clicks (it is stopped)


def small(path: Path) -> None:
    """The screenshot as a 256-colour PNG (a quarter of the size)."""
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256).save(path, optimize=True)


def test_buttons_in_headless_chromium(tmp_path):
    server = start_server(tmp_path / "comfy", comfy_path())
    try:
        server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
        server.post("/settings/Comfy.Minimap.Visible", False)  # nothing over the node in the screenshots
        graph = training_graph(server, "browser_controls", STEPS)
        trainer, save_lora = nodes_of(graph, "FlowTrainTrainer")[0], nodes_of(graph, "FlowTrainSaveLora")[0]
        graph_file = tmp_path / "graph.json"
        graph_file.write_text(json.dumps(graph))
        shots = Path(os.environ.get("FLOWTRAIN_SCREENSHOTS") or tmp_path / "shots").resolve()
        shots.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["node", str(ROOT / "tests" / "web" / "browser_controls.mjs"), server.url, str(graph_file),
                               trainer, str(shots)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "CHROMIUM": CHROMIUM})
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_tail()}"
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(seen, indent=1))
        stages = seen["stages"]
        assert stages["paused"]["step_2s_later"] == int(stages["paused"]["readout"].split("/")[0].split()[-1])
        assert stages["reloaded"]["readout"].startswith("step ")  # the chart came back after the reload
        for name in ("trainer_running.png", "trainer_paused.png"):
            assert (shots / name).stat().st_size > 10_000
            small(shots / name)

        history = server.wait_for_history(server.wait_for_prompt_id())
        assert history["status"]["status_str"] == "success", history["status"]
        assert history["outputs"][save_lora]["text"]  # the graph went on after the Stop
        run_dir = server.root / "output" / "flowtrain" / "browser_controls"
        with safe_open(str(run_dir / "lora_final.safetensors"), "pt") as f:
            stopped_at = int(f.metadata()["flowtrain.steps"])
        complete = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoint_*/COMPLETE"))
        assert len(complete) >= 2 and complete[-1] == stopped_at  # pause and save now, then the stop's own
    finally:
        server.stop()
