"""The FLUX.2 Klein DOP example (``flux2_klein_subject_dop``, API form) executed by a real,
in-process ComfyUI on CPU with the tiny FLUX.2 model: DOP runs, previews with and without
the trigger are written and announced while training, the validation curve is drawn.

The text encoder is replaced by seeded CONDITIONING (``test_pack``): every caption with
the trigger gets one, DOP's class captions get the DOP node's ``class_conditioning``.
Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import json
import math

import pytest

from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_workflows import CASES, env  # noqa: E402,F401  (shared session fixture and models)

NAME = "flux2_klein_subject_dop"
PREVIEWS = ["p0_plain.png", "p0_trigger.png", "p1_plain.png", "p1_trigger.png"]  # two prompts, ± trigger


def dop_graph(env, output_name: str) -> dict:  # noqa: F811
    case = CASES["flux2_klein_style_lora"]  # the same tiny FLUX.2 (Klein-like) model and VAE
    g = use_test_conditioning(load_api_workflow(NAME), width=64, pooled=0)
    g = shrink(g, unet=case["unet"], vae=case["vae"], dataset=env.input / "flowtrain_dataset",
               output_name=output_name, steps=3, preview_every=2)
    g["901"] = {"class_type": "FlowTrainTestConditioning", "inputs": {"width": 64, "length": 7, "pooled_width": 0,
                                                                      "seed": 2}}
    g[nodes_of(g, "FlowTrainDopSettings")[0]]["inputs"]["class_conditioning"] = ["901", 0]
    g[nodes_of(g, "FlowTrainPreviewSettings")[0]]["inputs"]["validation_every"] = 2
    return g


def test_example_workflow_is_the_dop_chain():
    g = load_api_workflow(NAME)
    (trainer,) = nodes_of(g, "FlowTrainTrainer")
    (dop,) = nodes_of(g, "FlowTrainDopSettings")
    (clip,) = nodes_of(g, "CLIPLoader")
    assert g[trainer]["inputs"]["dop"] == [dop, 0] and g[trainer]["inputs"]["clip"] == [clip, 0]
    assert g[clip]["inputs"]["type"] == "flux2"  # ComfyUI loads Klein's Qwen3 encoder with type flux2 (or flux)
    d = g[dop]["inputs"]
    assert (d["enabled"], d["class_word"], d["multiplier"]) == (True, "person", 1.0)
    captions = g[nodes_of(g, "FlowTrainCaptions")[0]]["inputs"]
    assert (captions["trigger_word"], captions["class_word"]) == ("sks", "person")
    preview = g[nodes_of(g, "FlowTrainPreviewSettings")[0]]["inputs"]
    assert len(preview["prompts"].splitlines()) == 2 and preview["every_n_steps"] > 0 and preview["validation_every"] > 0
    sampler = g[nodes_of(g, "FlowTrainSamplerPreview")[0]]["inputs"]
    assert sampler["mode"] == "images" and sampler["model"] == [trainer, 0]
    assert g[nodes_of(g, "SaveImage")[0]]["inputs"]["images"] == [nodes_of(g, "FlowTrainSamplerPreview")[0], 0]


def test_dop_workflow_trains_with_dop_previews_and_validation(env):  # noqa: F811
    import harness

    output_name = "wf_dop"
    graph = dop_graph(env, output_name)
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    assert any(t.startswith("finished: 3 steps") for n, t in stub.progress_text if n == trainer), stub.progress_text
    run_dir = env.output / "flowtrain" / output_name

    # DOP ran on every step (every_n_steps=1): its term is in the saved history; zero at step 1
    # (the LoRA starts as the identity, so the prior and the LoRA agree), positive after
    history = json.loads((run_dir / "checkpoint_000003" / "training_state.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(set(h["terms"]) == {"flow", "dop"} for h in history), history
    dop = [h["terms"]["dop"] for h in history]
    assert dop[0] == 0.0 and all(math.isfinite(v) and v > 0 for v in dop[1:]), dop

    # previews with and without the trigger, before training, at step 2 and at the end ...
    for folder in ("baseline", "step_000002", "final"):
        assert sorted(p.name for p in (run_dir / "previews" / folder).glob("*.png")) == PREVIEWS, folder
    # ... and announced while training ran: the step-2 images before step 3 (preview callbacks run
    # before the progress report of their step)
    events = [(e, d) for e, d, _ in stub.messages if e in ("flowtrain.progress", "flowtrain.preview")]
    order = [f"p{d['step']}" if e == "flowtrain.progress" else d["images"][0]["subfolder"].rsplit("/", 1)[-1]
             for e, d in events]
    assert order == ["baseline", "p1", "step_000002", "p2", "p3", "final"], order
    for e, d in events:
        if e == "flowtrain.preview":
            assert d["node"] == trainer and sorted(i["filename"] for i in d["images"]) == PREVIEWS
            assert all(i["type"] == "output" and i["subfolder"].startswith(f"flowtrain/{output_name}/previews/")
                       for i in d["images"])

    # the validation loss: before training, every 2 steps and at the end, drawn in the chart
    validation = json.loads((run_dir / "validation.json").read_text())
    assert [h["step"] for h in validation["history"]] == [0, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in validation["history"])
    svg = (run_dir / "learning_curve.svg").read_text()
    assert ">validation</text>" in svg and svg.count("<polyline") == 3

    # the Sampler preview (images mode) of the trained model went to SaveImage
    images = ex.caches.outputs.get_local(nodes_of(graph, "FlowTrainSamplerPreview")[0]).outputs[0][0]
    assert images.shape[1:] == (64, 64, 3)
    assert ex.history_result["outputs"][nodes_of(graph, "SaveImage")[0]]["images"]
