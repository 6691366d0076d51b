"""Cancel during training: the Trainer stops after the step in progress, the LoRA trained
so far is saved, ComfyUI reports the prompt as interrupted, the input MODEL carries no
LoRA layers and the next prompt runs."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_workflows import CASES, env  # noqa: E402,F401  (shared session fixture and models)


def graph_for(env, output_name: str, steps: int, preview_every: int = 0) -> dict:  # noqa: F811
    case = CASES["flux1_dev_subject_lora"]
    g = use_test_conditioning(load_api_workflow("flux1_dev_subject_lora"), width=64, pooled=case["pooled"])
    g = shrink(g, unet=case["unet"], vae=case["vae"], dataset=env.input / "flowtrain_dataset",
               output_name=output_name, steps=steps, preview_every=preview_every)
    return g


def test_cancel_saves_partial_lora_and_comfy_stays_healthy(env, monkeypatch):  # noqa: F811
    import comfy.model_management as mm
    import harness

    stub = env.stub
    original = stub.send_sync

    def send_sync(event, data, sid=None):
        original(event, data, sid)
        if event == "flowtrain.progress" and data["step"] == 2:
            mm.interrupt_current_processing()  # what the Cancel button (POST /interrupt) does

    monkeypatch.setattr(stub, "send_sync", send_sync)
    graph = graph_for(env, "wf_cancel", steps=50)
    ex, _ = harness.run_prompt(graph)
    assert not ex.success
    interrupted = [d for e, d, _ in stub.messages if e == "execution_interrupted"]
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    assert interrupted and interrupted[0]["node_id"] == trainer
    steps = [d["step"] for e, d, _ in stub.messages if e == "flowtrain.progress"]
    assert steps == [1, 2]  # stopped within one step of the Cancel

    lora = env.output / "flowtrain" / "wf_cancel" / "lora_final.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["flowtrain.steps"] == "2" and len(list(f.keys())) > 0

    base = ex.caches.outputs.get_local(nodes_of(graph, "UNETLoader")[0]).outputs[0][0]
    assert not any("lora" in type(m).__name__.lower() for m in base.model.diffusion_model.modules())
    assert mm.in_training is False and not mm.processing_interrupted()

    monkeypatch.setattr(stub, "send_sync", original)
    ex2, _ = harness.run_prompt(graph_for(env, "wf_after_cancel", steps=1))
    assert ex2.success
