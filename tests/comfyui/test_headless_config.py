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

UNET, VAE = "tiny_flux1_headless.safetensors", "tiny_flux1_headless_vae.safetensors"


def test_node_config_trains_from_the_cli_and_loads_back(tmp_path_factory, monkeypatch, caplog):
    import harness
    from tiny_files import CLIP_HIDDEN, T5_D, write_models

    from trainer_core import cli

    env = comfy_env(tmp_path_factory.mktemp("comfy"))
    import nodes  # ComfyUI's, importable once comfy_env loaded it
    root = tmp_path_factory.mktemp("headless")
    models = write_models(root, "flux1")  # text encoders + tokenizers for the command line
    harness.write_tiny_flux(env.models / UNET, "flux1", guidance=True, context_dim=T5_D, vec_dim=CLIP_HIDDEN)
    harness.write_tiny_vae(env.models / VAE, "flux1")  # ComfyUI's VAELoader wants the 128-wide encoder
    for f in (models / "diffusion_models").iterdir():
        f.unlink()
    shutil.copy(env.models / UNET, models / "diffusion_models" / UNET)
    (models / "vae" / "ae.safetensors").unlink()
    shutil.copy(env.models / VAE, models / "vae" / VAE)
    dataset = write_dataset(env.input / "headless_dataset")

    graph = use_test_conditioning(load_api_workflow("flux1_dev_subject_lora"), width=T5_D, pooled=CLIP_HIDDEN)
    graph = shrink(graph, unet=UNET, vae=VAE, dataset=dataset, output_name="headless_node")
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] == "execution_error"]
    node_run = env.output / "flowtrain" / "headless_node"
    written = json.loads((node_run / "config.json").read_text())
    assert written["model"] == {"file": UNET, "arch": "flux1"}

    monkeypatch.setattr(cli.StopFlag, "install", lambda self: None)
    caplog.set_level(logging.INFO)
    argv = ["train", "--config", str(node_run / "config.json"), "--comfyui-models", str(models),
            "--tokenizers", str(root / "tokenizers"), "--output-dir", str(root / "out"), "--name", "headless_cli",
            "--device", "cpu"]
    assert cli.main(argv) == 0, caplog.text
    cli_run = root / "out" / "headless_cli"
    cli_lora, node_lora = (load_file(str(r / "lora_final.safetensors")) for r in (cli_run, node_run))
    assert set(cli_lora) == set(node_lora)  # the same layers, under the same names
    assert json.loads((cli_run / "config.json").read_text())["config"]["train"]["steps"] == written["config"]["train"]["steps"]
    assert (cli_run / "samples.png").is_file()  # the node's preview prompts: previews and samples.png

    shutil.copy(cli_run / "lora_final.safetensors", env.loras / "headless_cli.safetensors")
    base = harness.load_flux(env.models / UNET)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "headless_cli.safetensors", 1.0)[0]
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
    assert not bad and len(patched.patches) == len(cli_lora) // 3  # down, up, alpha per layer
