"""Settings nodes and the ``preset`` widget in real ComfyUI: a graph chains one settings node
of each group, each with a non-default value, and the run's ``config.json`` shows them all;
``preset`` auto detects tiny models with the real depth/width ratios of each variant."""
from __future__ import annotations

import json

import pytest
from test_workflows import env  # noqa: F401 (fixture)
from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

# variant → tiny model keeping its ratios (single/double blocks, text/hidden width) and guidance flag
TINY = {
    "klein-4b": dict(arch="flux2", hidden=128, depth=1, depth_single=4, context_dim=320, guidance=False),
    "klein-9b": dict(arch="flux2", hidden=128, depth=1, depth_single=3, context_dim=384, guidance=False),
    "flux2-dev": dict(arch="flux2", hidden=128, depth=1, depth_single=6, context_dim=320, guidance=True),
    "flux1-dev": dict(arch="flux1", hidden=384, depth=1, depth_single=2, context_dim=512, guidance=True),
    "flux1-schnell": dict(arch="flux1", hidden=384, depth=1, depth_single=2, context_dim=512, guidance=False),
}

SETTINGS = {  # one non-default value (or a few) per settings group
    "FlowTrainLossSettings": {"min_snr_gamma": 5.0, "noise_offset": 0.05},
    "FlowTrainOptimizerSettings": {"warmup_steps": 1, "loraplus_lr_ratio": 16.0},
    "FlowTrainEmaSettings": {"enabled": True, "decay": 0.99},
    "FlowTrainAugmentSettings": {"flip": True, "tag_dropout": 0.1},
    "FlowTrainMemorySettings": {"gradient_checkpointing": "off", "precision": "fp32"},
    "FlowTrainRunSettings": {"log_every": 1, "validation_sigmas": "0.5"},
}


def _settings():
    import importlib.util
    import sys
    from pathlib import Path

    if "flowtrain_node_settings" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "nodes" / "settings.py"
        spec = importlib.util.spec_from_file_location("flowtrain_node_settings", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["flowtrain_node_settings"] = module
        spec.loader.exec_module(module)
    return sys.modules["flowtrain_node_settings"]


def _tiny(env, name):  # noqa: F811
    import harness

    kw = dict(TINY[name])
    path = env.models / f"tiny_{name}.safetensors"
    if not path.exists():
        harness.write_tiny_flux(path, kw.pop("arch"), vec_dim=32, **kw)
    return path


@pytest.mark.parametrize("name", sorted(TINY))
def test_auto_preset_detects_each_variant_from_the_weights(env, name):  # noqa: F811
    import harness

    bridge = harness.load_bridge()
    mp = harness.load_flux(_tiny(env, name))
    from trainer_core.models.variants import detect_variant, module_shape

    found = detect_variant(module_shape(mp.model.diffusion_model, bridge.detect_arch(mp).arch))
    assert (found.variant.name, found.how) == (name, "ratios")


def test_each_settings_group_and_the_preset_reach_config_json(env):  # noqa: F811
    import harness

    unet = _tiny(env, "klein-4b").name
    graph = use_test_conditioning(load_api_workflow("flux2_klein_style_lora"), width=320, pooled=0)
    graph = shrink(graph, unet=unet, vae="tiny_flux2_vae.safetensors", dataset=env.input / "flowtrain_dataset",
                   output_name="wf_settings", steps=2, preview_every=0)
    trainer = nodes_of(graph, "FlowTrainTrainer")[0]
    previous = None
    for i, (node_type, widgets) in enumerate(SETTINGS.items()):
        nid = f"settings{i}"
        group = next(g for g in _settings().GROUPS if g.node_id == node_type)
        inputs = {w.name: w.default for w in _settings().widget_specs(group)}  # an API prompt lists every widget
        graph[nid] = {"class_type": node_type, "inputs": {**inputs, **widgets}}
        if previous is not None:
            graph[nid]["inputs"]["settings"] = [previous, 0]
        previous = nid
    graph[trainer]["inputs"]["settings"] = [previous, 0]
    graph[trainer]["inputs"]["preset"] = "auto"
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    doc = json.loads((env.output / "flowtrain" / "wf_settings" / "config.json").read_text())["config"]
    assert (doc["loss"]["min_snr_gamma"], doc["flow"]["noise_offset"]) == (5.0, 0.05)
    assert (doc["optim"]["warmup_steps"], doc["optim"]["loraplus_lr_ratio"]) == (1, 16.0)
    assert doc["ema"]["enabled"] and doc["ema"]["decay"] == 0.99
    assert doc["data"]["augment"]["flip"] and doc["data"]["captions"]["tag_dropout"] == 0.1
    assert (doc["train"]["gradient_checkpointing"], doc["train"]["precision"]) == ("off", "fp32")
    assert (doc["train"]["log_every"], doc["validation"]["sigmas"]) == (1, [0.5])
    # the preset: Klein 4B's, except what the graph set (LoRA Config's rank 4, shrink's lr)
    assert doc["model"] == {"preset": "klein-4b", "variant": "klein-4b", "file": unet}
    assert (doc["flow"]["sigma_scheme"], doc["flow"]["weighting"], doc["dop"]["every_n_steps"]) == (
        "balanced", "bell_shaped", 1)
    assert (doc["lora"]["rank"], doc["optim"]["lr"]) == (4, 2e-3)
    texts = [t for node, t in stub.progress_text if node == trainer]
    assert any(t.startswith("preset: FLUX.2 Klein 4B — rank 4") for t in texts), texts
    # the metadata and the model card name the variant the preset came from
    from trainer_core.config import TrainingConfig
    from trainer_core.lora.io import load_lora_file

    run = env.output / "flowtrain" / "wf_settings"
    _, md = load_lora_file(str(run / "lora_final.safetensors"))
    assert md["ss_base_model_version"] == "flux_2_klein_4b" and md["ss_sd_model_name"] == unet
    assert "FLUX.2 Klein 4B" in (run / "README.md").read_text()
    assert json.loads(TrainingConfig.from_dict(doc).to_json()) == doc  # runs again as it is
