"""The example workflows with another LoRA algorithm (LoRA Config's ``algorithm``), then
continued from their saved file (the Trainer's ``existing_lora``), in real ComfyUI."""
from __future__ import annotations

import logging

import pytest
from test_workflows import CASES, denoise, env, rel_diff  # noqa: F401 (env is a fixture)
from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")


def graph_for(env, name, output_name, algorithm, existing_lora="", steps=3):  # noqa: F811
    case = CASES[name]
    graph = use_test_conditioning(load_api_workflow(name), width=64, pooled=case["pooled"])
    graph = shrink(graph, unet=case["unet"], vae=case["vae"], dataset=env.input / "flowtrain_dataset",
                   output_name=output_name, steps=steps, preview_every=0)
    graph[nodes_of(graph, "FlowTrainLoraConfig")[0]]["inputs"]["algorithm"] = algorithm
    graph[nodes_of(graph, "FlowTrainTrainer")[0]]["inputs"]["existing_lora"] = existing_lora
    return graph


def run(env, name, output_name, algorithm, existing_lora="", steps=3):  # noqa: F811
    import harness

    graph = graph_for(env, name, output_name, algorithm, existing_lora, steps)
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    return graph, ex


@pytest.mark.parametrize(("name", "algorithm"), [("flux1_dev_subject_lora", "lokr"),
                                                 ("flux2_klein_style_lora", "dora")])
def test_algorithm_workflow_then_continue_from_its_file(env, name, algorithm, caplog):  # noqa: F811
    import nodes

    from trainer_core.lora.io import load_lora_file

    case = CASES[name]
    output_name = f"wf_{algorithm}"
    graph, ex = run(env, name, output_name, algorithm)
    out = lambda nid: ex.caches.outputs.get_local(nid).outputs  # noqa: E731
    trained_model, lora, lora_path, _ = (slot[0] for slot in out(nodes_of(graph, "FlowTrainTrainer")[0]))
    base = out(nodes_of(graph, "UNETLoader")[0])[0][0]
    key = {"lokr": ".lokr_w", "dora": ".dora_scale"}[algorithm]
    assert any(key in k for k in lora)
    _, md = load_lora_file(lora_path)
    assert md["flowtrain.algorithm"] == algorithm and md["ss_network_module"] == "lycoris.kohya"
    with caplog.at_level(logging.WARNING):
        from_file = nodes.LoraLoaderModelOnly().load_lora_model_only(base, f"{output_name}.safetensors", 1.0)[0]
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
    assert not bad and len(from_file.patches) > 0
    y_trained, y_file = denoise(trained_model, case), denoise(from_file, case)
    assert rel_diff(y_file, y_trained) <= 1e-3
    assert rel_diff(y_trained, denoise(base, case)) > 3e-5  # LoKr FLUX.1 ~2.8e-4, DoRA Klein ~3.6e-4

    # continue from the file in models/loras (its name, as LoraLoader lists it)
    graph2, ex2 = run(env, name, f"{output_name}_more", algorithm, existing_lora=f"{output_name}.safetensors", steps=2)
    path2 = ex2.caches.outputs.get_local(nodes_of(graph2, "FlowTrainTrainer")[0]).outputs[2][0]
    _, md2 = load_lora_file(path2)
    assert md2["ss_continued_from"] == f"{output_name}.safetensors"


@pytest.mark.parametrize(("name", "algorithm"), [("flux1_dev_subject_lora", "loha"),
                                                 ("flux2_klein_style_lora", "lokr")])
def test_cancel_then_requeue_resumes_exactly(env, monkeypatch, name, algorithm):  # noqa: F811
    import comfy.model_management as mm
    import harness
    import torch
    from safetensors.torch import load_file

    stub = env.stub
    original = stub.send_sync

    def send_sync(event, data, sid=None):
        original(event, data, sid)
        if event == "flowtrain.progress" and data["step"] == 2:
            mm.interrupt_current_processing()

    monkeypatch.setattr(stub, "send_sync", send_sync)
    out = f"wf_resume_{algorithm}"
    ex, _ = harness.run_prompt(graph_for(env, name, out, algorithm, steps=4))
    assert not ex.success
    monkeypatch.undo()
    ex, _ = harness.run_prompt(graph_for(env, name, out, algorithm, steps=4))
    assert ex.success
    ex, _ = harness.run_prompt(graph_for(env, name, f"{out}_straight", algorithm, steps=4))
    assert ex.success
    resumed = load_file(str(env.output / "flowtrain" / out / "lora_final.safetensors"))
    straight = load_file(str(env.output / "flowtrain" / f"{out}_straight" / "lora_final.safetensors"))
    assert resumed.keys() == straight.keys() and any(".lokr_w" in k or ".hada_w" in k for k in resumed)
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed), "resuming changed the trained adapter"
