"""Checkpoints, exact resume and file-based control through a real, in-process ComfyUI
(tiny FLUX.1-dev, CONDITIONING in place of the text encoders, previews off):

* Cancel after step 2, queue the same graph again with a new executor (as after a restart):
  training resumes at step 3 and ends with the same LoRA as an uninterrupted run;
* a ``.stop`` file in the run folder ends the Trainer normally after the step in progress,
  with outputs; queueing the same graph again (same executor) resumes it.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workflow_harness import comfy_path, nodes_of

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_interrupt import graph_for  # noqa: E402  (the FLUX.1-dev example, tiny, previews off)
from test_workflows import env  # noqa: E402,F401  (shared session fixture and models)


def steps_of(path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["flowtrain.steps"])


def progress_steps(stub) -> list[int]:
    return [d["step"] for e, d, _ in stub.messages if e == "flowtrain.progress"]


def on_progress(monkeypatch, stub, step: int, action) -> None:
    """Call ``action()`` when the Trainer reports ``step`` (from inside the training loop)."""
    original = stub.send_sync

    def send_sync(event, data, sid=None):
        original(event, data, sid)
        if event == "flowtrain.progress" and data["step"] == step:
            action()

    monkeypatch.setattr(stub, "send_sync", send_sync)


def execute(ex, graph: dict, stub) -> None:
    """Run ``graph`` on an existing executor (ComfyUI's cache is kept, as in one session).
    A fresh copy per queue, as the server parses each request: ComfyUI stores the nodes'
    fingerprints in the prompt dict it runs."""
    import execution

    graph = json.loads(json.dumps(graph))
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, graph, None))
    assert valid[0], valid
    stub.messages.clear()
    ex.execute(graph, pid, {"client_id": "tests"}, valid[2])


def test_cancel_then_requeue_resumes_exactly(env, monkeypatch):  # noqa: F811
    import comfy.model_management as mm
    import harness

    run_dir = env.output / "flowtrain" / "wf_resume"
    on_progress(monkeypatch, env.stub, 2, mm.interrupt_current_processing)  # Cancel during step 3
    ex, stub = harness.run_prompt(graph_for(env, "wf_resume", steps=4))
    assert not ex.success and progress_steps(stub) == [1, 2]
    assert (run_dir / "checkpoint_000002" / "COMPLETE").is_file()  # Cancel saved a resumable checkpoint
    assert steps_of(run_dir / "lora_final.safetensors") == 2
    monkeypatch.undo()

    graph = graph_for(env, "wf_resume", steps=4)
    ex, stub = harness.run_prompt(graph)  # a new executor: nothing cached, as after a restart
    assert ex.success and progress_steps(stub) == [3, 4]
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    assert any(t.startswith("finished: 4 steps") for n, t in stub.progress_text if n == trainer)
    final = run_dir / "lora_final.safetensors"
    assert steps_of(final) == 4 and ex.caches.outputs.get_local(trainer).outputs[2][0] == str(final)
    state = json.loads((run_dir / "training_state.json").read_text())
    assert (state["status"], state["step"], len(state["losses"])) == ("finished", 4, 4)

    ex, _ = harness.run_prompt(graph_for(env, "wf_straight", steps=4))  # the same run without the Cancel
    assert ex.success
    resumed, straight = load_file(str(final)), load_file(str(env.output / "flowtrain" / "wf_straight" / final.name))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed), "resuming changed the trained LoRA"


def test_stop_file_ends_the_node_normally_and_requeue_resumes(env, monkeypatch):  # noqa: F811
    import execution

    stub = env.stub
    run_dir = env.output / "flowtrain" / "wf_stop"
    on_progress(monkeypatch, stub, 2, lambda: (run_dir / ".stop").touch())  # after step 2's report
    graph = graph_for(env, "wf_stop", steps=4)
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    ex = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    execute(ex, graph, stub)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    assert progress_steps(stub) == [1, 2]  # the step in progress when the file appeared is the last one
    model, lora, lora_path, curve = (slot[0] for slot in ex.caches.outputs.get_local(trainer).outputs)
    assert lora_path == str(run_dir / "lora_final.safetensors") and steps_of(lora_path) == 2
    assert lora.metadata["flowtrain.steps"] == "2" and len(lora) > 0 and len(model.patches) > 0
    assert any(t.startswith("stopped (.stop file): 2 steps") for n, t in stub.progress_text if n == trainer)
    assert not (run_dir / ".stop").exists() and (run_dir / "checkpoint_000002" / "COMPLETE").is_file()
    save_lora = nodes_of(graph, "FlowTrainSaveLora")[0]
    assert ex.history_result["outputs"][save_lora]["text"]  # the nodes after the Trainer ran too
    monkeypatch.undo()

    execute(ex, graph, stub)  # same graph, same executor: not served from the cache, resumed
    assert ex.success and progress_steps(stub) == [3, 4]
    assert steps_of(run_dir / "lora_final.safetensors") == 4
