"""The minutes before step 1 through a real, in-process ComfyUI (tiny FLUX.1-dev example
workflow, a CLIP that records what it encodes: ``FlowTrainTestClip``):

* the Trainer reports its phases and the caching counts on the node (``flowtrain.phase``
  events, progress text) before the first step;
* preview prompts, the empty negative and the Sampler Preview's prompts are encoded once:
  queueing again (a new executor, as after a restart) resumes the run and encodes nothing
  through FlowTrain; the previews of the first queue are still there.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import logging

import pytest

from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_workflows import CASES, env  # noqa: E402,F401  (shared session fixture and models)


def spy_graph(env, output_name: str, steps: int) -> dict:  # noqa: F811
    case = CASES["flux1_dev_subject_lora"]
    g = load_api_workflow("flux1_dev_subject_lora")
    (clip,) = nodes_of(g, "DualCLIPLoader")
    g[clip] = {"class_type": "FlowTrainTestClip", "inputs": {"width": 64, "pooled_width": case["pooled"], "seed": 1}}
    return shrink(g, unet=case["unet"], vae=case["vae"], dataset=env.input / "flowtrain_dataset",
                  output_name=output_name, steps=steps, preview_every=2)


def test_phases_on_the_node_and_prompts_encoded_once(env, caplog, monkeypatch):  # noqa: F811
    import harness
    import nodes

    spy = nodes.NODE_CLASS_MAPPINGS["FlowTrainTestClip"]
    spy.encoded.clear()
    before_step_1: list = []  # what the Trainer had encoded when it reported step 1
    original = env.stub.send_sync

    def send_sync(event, data, sid=None):
        original(event, data, sid)
        if event == "flowtrain.progress" and data["step"] == 1:
            before_step_1.extend(spy.encoded)

    monkeypatch.setattr(env.stub, "send_sync", send_sync)
    graph = spy_graph(env, "wf_prompt_cache", steps=2)
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    with caplog.at_level(logging.INFO):
        ex, stub = harness.run_prompt(graph)
    monkeypatch.undo()
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]

    # phases on the node: loading, the caching with counts, then training, previews, saving, done
    phases = [d for e, d, _ in stub.messages if e == "flowtrain.phase" and d["node"] == trainer]
    names = list(dict.fromkeys(d["phase"] for d in phases))
    assert names == ["loading", "encoding images", "encoding captions", "training", "previews", "saving", "done"]
    images = [(d["n"], d["total"]) for d in phases if d["phase"] == "encoding images"]
    assert images[0] == (0, 3) and images[-1] == (3, 3)  # the dataset's 3 images
    first_step = next(i for i, (e, d, _) in enumerate(stub.messages) if e == "flowtrain.progress")
    last_caching = max(i for i, (e, d, _) in enumerate(stub.messages)
                       if e == "flowtrain.phase" and d["phase"].startswith("encoding"))
    assert last_caching < first_step
    texts = [t for n, t in stub.progress_text if n == trainer]
    assert any(t.startswith("encoding images 3/3") for t in texts), texts
    assert any(t.startswith("encoding captions") for t in texts), texts

    # every text FlowTrain needs went through the encoder once, before training
    preview = graph[nodes_of(graph, "FlowTrainPreviewSettings")[0]]["inputs"]["prompts"].strip()
    trainer_texts = [t for path, t in before_step_1 if path == "direct"]
    assert len(trainer_texts) == len(set(trainer_texts)) and "" in trainer_texts  # each once, the negative too
    assert preview in trainer_texts or f"sks, {preview}" in trainer_texts, (preview, trainer_texts)
    later = [t for path, t in spy.encoded[len(before_step_1):] if path == "direct"]
    assert later and not set(later) & {"sks", "sks, picture 0"}  # only the Sampler Preview's prompts
    users = [r.getMessage() for r in caplog.records if "use it too" in r.getMessage()]
    assert len(users) == 1 and "nodes 12, 20, 22 use it too" in users[0], users  # the graph's other CLIP users
    run_dir = env.output / "flowtrain" / "wf_prompt_cache"
    first_previews = sorted(p.name for p in (run_dir / "previews" / "final").glob("*.png"))
    assert first_previews and (run_dir / "previews" / "baseline").is_dir()

    # queue again with one more step and a new executor: resumed, and FlowTrain encodes nothing
    spy.encoded.clear()
    caplog.clear()
    graph = spy_graph(env, "wf_prompt_cache", steps=3)
    with caplog.at_level(logging.INFO):
        ex, stub = harness.run_prompt(graph)
    assert ex.success
    assert [d["step"] for e, d, _ in stub.messages if e == "flowtrain.progress"] == [3]
    core = [graph[n]["inputs"]["text"] for n in nodes_of(graph, "CLIPTextEncode")]  # ComfyUI's own nodes
    assert sorted(t for _, t in spy.encoded) == sorted(core), spy.encoded  # and nothing for FlowTrain
    assert any(r.getMessage().startswith("text encodes saved by the cache") for r in caplog.records)
    assert (run_dir / "previews" / "baseline").is_dir()  # the first queue's previews survived the resume
    caching = [(d["phase"], d["n"], d["total"]) for e, d, _ in stub.messages
               if e == "flowtrain.phase" and d["phase"].startswith("encoding")]
    assert caching == [("encoding images", 0, 0), ("encoding captions", 0, 0)]


def test_release_unloads_the_encoders_and_their_clones(env, caplog):  # noqa: F811
    """``release`` takes a clone of the VAE's patcher (what ComfyUI holds loaded when a node
    worked on a copy) out of ComfyUI's loaded models, and drops the encoder's CLIP."""
    import comfy.model_management as mm
    import harness

    trainer = env.pack.nodes.trainer
    vae = harness.load_vae(env.models / CASES["flux1_dev_subject_lora"]["vae"])
    clone = vae.patcher.clone()
    mm.load_models_gpu([clone])
    ours = lambda: [m for m in mm.current_loaded_models if m.model is not None and m.model.model is vae.patcher.model]  # noqa: E731
    assert [m.model for m in ours()] == [clone]

    class Encoder:
        clip = object()

        def release(self):
            self.clip = None

    encoder = Encoder()
    with caplog.at_level(logging.INFO):
        trainer.release(vae, None, encoder, clip_users=["20"])
    assert ours() == [] and encoder.clip is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("no weights on an accelerator" in m for m in messages)  # CPU: said, not pretended
