"""A graph's run, headless: the ``config.json`` a Trainer node wrote trains unchanged from the
command line on the same diffusion-model file (found by the name the run recorded), and the
LoRA it writes loads back in ComfyUI (LoraLoaderModelOnly) with every key used, with exactly
the keys the node's own LoRA has."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from safetensors.torch import load_file

from workflow_harness import comfy_env, comfy_path, load_api_workflow, shrink, use_test_conditioning, write_dataset

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

CASES = {"flux1": ("flux1_dev_subject_lora", True), "flux2": ("flux2_klein_style_lora", False)}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_node_config_trains_from_the_cli_and_loads_back(tmp_path_factory, monkeypatch, caplog, arch):
    import harness
    from tiny_files import CLIP_HIDDEN, QWEN_HIDDEN, T5_D, write_models

    from trainer_core import cli

    env = comfy_env(tmp_path_factory.mktemp("comfy"))
    import nodes  # ComfyUI's, importable once comfy_env loaded it
    workflow, guidance = CASES[arch]
    unet, vae = f"tiny_{arch}_headless.safetensors", f"tiny_{arch}_headless_vae.safetensors"
    root = tmp_path_factory.mktemp("headless")
    models = write_models(root, arch, guidance=guidance)  # text encoders + tokenizers for the command line
    width, pooled = (T5_D, CLIP_HIDDEN) if arch == "flux1" else (3 * QWEN_HIDDEN, 0)
    harness.write_tiny_flux(env.models / unet, arch, guidance=guidance, context_dim=width, vec_dim=CLIP_HIDDEN)
    harness.write_tiny_vae(env.models / vae, arch)  # ComfyUI's VAELoader wants the 128-wide encoder
    for f in (models / "diffusion_models").iterdir():
        f.unlink()
    shutil.copy(env.models / unet, models / "diffusion_models" / unet)
    for f in (models / "vae").iterdir():
        f.unlink()
    shutil.copy(env.models / vae, models / "vae" / vae)
    dataset = write_dataset(env.input / "headless_dataset")

    graph = use_test_conditioning(load_api_workflow(workflow), width=width, pooled=pooled)
    graph = shrink(graph, unet=unet, vae=vae, dataset=dataset, output_name=f"headless_node_{arch}")
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] == "execution_error"]
    node_run = env.output / "flowtrain" / f"headless_node_{arch}"
    written = json.loads((node_run / "config.json").read_text())
    assert written["model"] == {"file": unet, "arch": arch}

    monkeypatch.setattr(cli.StopFlag, "install", lambda self: None)
    caplog.set_level(logging.INFO)
    argv = ["train", "--config", str(node_run / "config.json"), "--comfyui-models", str(models),
            "--tokenizers", str(root / "tokenizers"), "--output-dir", str(root / "out"), "--name", f"headless_cli_{arch}",
            "--device", "cpu"]
    assert cli.main(argv) == 0, caplog.text
    cli_run = root / "out" / f"headless_cli_{arch}"
    cli_lora, node_lora = (load_file(str(r / "lora_final.safetensors")) for r in (cli_run, node_run))
    assert set(cli_lora) == set(node_lora)  # the same layers, under the same names
    assert json.loads((cli_run / "config.json").read_text())["config"]["train"]["steps"] == written["config"]["train"]["steps"]
    assert (cli_run / "samples.png").is_file()  # the node's preview prompts: previews and samples.png

    shutil.copy(cli_run / "lora_final.safetensors", env.loras / f"headless_cli_{arch}.safetensors")
    base = harness.load_flux(env.models / unet)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, f"headless_cli_{arch}.safetensors", 1.0)[0]
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
    layers = [k for k in cli_lora if k.endswith(("lora_down.weight", "lora_A.weight"))]
    assert not bad and len(patched.patches) == len(layers) > 0  # every trained layer patches the model
