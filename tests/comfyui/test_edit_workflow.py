"""The FLUX.1 Kontext edit-LoRA example workflow (paired images in control/ folders) in a real,
in-process ComfyUI on CPU with the tiny FLUX.1-dev model (a Kontext model loads as FLUX.1-dev):
it trains, its validation loss on a held-out pair falls, the saved LoRA loads in core
LoraLoaderModelOnly with every key and reproduces the Trainer's MODEL, the in-training previews
edit a held reference with and without the LoRA, and the Sampler Preview and the usual
ReferenceLatent → KSampler graph edit an input image.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from test_workflows import CASES, denoise, env, rel_diff  # noqa: F401 (env is a fixture)
from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

NAME = "flux1_kontext_edit_lora"
CASE = CASES["flux1_dev_subject_lora"]  # the same tiny FLUX.1-dev files


def test_kontext_edit_workflow_trains_on_pairs(env, caplog):  # noqa: F811
    import harness
    import nodes

    from trainer_core.demo.edit_dataset import edit_pair, write_edit_dataset
    from trainer_core.lora.io import load_lora_file

    write_edit_dataset(env.input / "flowtrain_edit", size=64, count=5)
    reference, _ = edit_pair(64, np.random.default_rng(7))
    reference.save(env.input / "flowtrain_edit_input.png")
    output_name = "wf_kontext_edit"
    graph = use_test_conditioning(load_api_workflow(NAME), width=64, pooled=CASE["pooled"])
    graph = shrink(graph, unet=CASE["unet"], vae=CASE["vae"], dataset=env.input / "flowtrain_edit",
                   output_name=output_name, steps=12, preview_every=6)
    graph[nodes_of(graph, "FlowTrainPreviewSettings")[0]]["inputs"].update(validation_every=6, validation_images=1)
    dataset_node = graph[nodes_of(graph, "FlowTrainDataset")[0]]
    assert dataset_node["inputs"]["control_images"] is True
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    out = lambda nid: ex.caches.outputs.get_local(nid).outputs  # noqa: E731
    trained_model, lora, lora_path, _ = (slot[0] for slot in out(nodes_of(graph, "FlowTrainTrainer")[0]))
    base = out(nodes_of(graph, "UNETLoader")[0])[0][0]

    events = [d for e, d, _ in stub.messages if e == "flowtrain.progress"]
    assert len(events) == 12 and all(math.isfinite(d["loss"]) for d in events)
    run_dir = env.output / "flowtrain" / output_name
    history = json.loads((run_dir / "validation.json").read_text())["history"]
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"Kontext edit workflow: validation loss {first:.4f} -> {last:.4f}")
    assert last < first

    # the file through core LoraLoaderModelOnly == the Trainer's MODEL, every key loaded
    _, md = load_lora_file(lora_path)
    assert md["flowtrain.arch"] == "flux1"
    with caplog.at_level(logging.WARNING):
        from_file = nodes.LoraLoaderModelOnly().load_lora_model_only(base, f"{output_name}.safetensors", 1.0)[0]
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
    assert not bad and len(from_file.patches) > 0
    y_trained, y_file = denoise(trained_model, CASE), denoise(from_file, CASE)
    assert rel_diff(y_file, y_trained) <= 1e-3 and rel_diff(y_trained, denoise(base, CASE)) > 1e-5

    # in-training previews: a held reference edited with and without the LoRA
    final = sorted(p.name for p in (run_dir / "previews" / "final").glob("*.png"))
    assert final == ["p0_edit_base.png", "p0_edit_lora.png", "reference.png"]
    lora_img, base_img = (np.asarray(Image.open(run_dir / "previews" / "final" / f"p0_edit_{k}.png"), dtype=np.int16)
                          for k in ("lora", "base"))
    assert lora_img.shape == (64, 64, 3) and np.abs(lora_img - base_img).max() > 0
    # Sampler Preview: the input image edited at LoRA strengths 0 and 1 (one row, two columns)
    grid = out(nodes_of(graph, "FlowTrainSamplerPreview")[0])[0][0]
    assert tuple(grid.shape) == (1, 64, 128, 3)
    assert float((grid[:, :, :64] - grid[:, :, 64:]).abs().max()) > 0
    # ReferenceLatent → KSampler on the trained MODEL saved its image
    assert ex.history_result["outputs"][nodes_of(graph, "SaveImage")[-1]]["images"]
