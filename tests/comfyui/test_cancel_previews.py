"""Cancel while previews are on, in a real in-process ComfyUI: the final previews render
through ComfyUI's sampler, which raises the still-pending interrupt. The LoRA, a complete
checkpoint and the run's status are saved before them, so the run folder is complete and
queueing the graph again finishes (or resumes) the run.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import json

import pytest

from workflow_harness import comfy_path, nodes_of

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_interrupt import graph_for  # noqa: E402
from test_resume_control import on_progress, progress_steps, steps_of  # noqa: E402
from test_workflows import env  # noqa: E402,F401  (shared session fixture and models)


def _state(run_dir) -> dict:
    return json.loads((run_dir / "training_state.json").read_text())


@pytest.mark.parametrize("steps, cancel_at, requeued", [(2, 2, []), (4, 2, [3, 4])],
                         ids=["cancel_at_the_last_step", "cancel_mid_run"])
def test_cancel_with_previews_leaves_a_complete_resumable_run(env, monkeypatch, steps, cancel_at, requeued):  # noqa: F811
    import comfy.model_management as mm
    import harness

    name = f"wf_cancel_previews_{steps}"
    run_dir = env.output / "flowtrain" / name
    on_progress(monkeypatch, env.stub, cancel_at, mm.interrupt_current_processing)
    graph = graph_for(env, name, steps=steps, preview_every=1)
    ex, stub = harness.run_prompt(graph)
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    interrupted = [d for e, d, _ in stub.messages if e == "execution_interrupted"]
    assert not ex.success and interrupted and interrupted[0]["node_id"] == trainer  # ComfyUI saw the Cancel
    assert progress_steps(stub) == list(range(1, cancel_at + 1))
    assert steps_of(run_dir / "lora_final.safetensors") == cancel_at
    assert (run_dir / f"checkpoint_{cancel_at:06d}" / "COMPLETE").is_file()
    state = _state(run_dir)
    assert (state["status"], state["step"]) == ("stopped", cancel_at)
    assert not list((run_dir / "final").glob("*.png"))  # the final previews were the interrupted part
    assert not mm.processing_interrupted()
    monkeypatch.undo()

    ex, stub = harness.run_prompt(graph_for(env, name, steps=steps, preview_every=1))  # queue it again
    assert ex.success and progress_steps(stub) == requeued
    assert steps_of(run_dir / "lora_final.safetensors") == steps
    if requeued:
        assert _state(run_dir)["status"] == "finished"
