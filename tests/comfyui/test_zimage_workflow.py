"""The Z-Image example workflow (``zimage_style_lora``) in a real, in-process ComfyUI with a
tiny Z-Image in its UNETLoader, a tiny FLUX.1 VAE (Z-Image's) and test CONDITIONING for
Qwen3-4B: the FlowTrain Trainer lowers the loss on the training images, the saved
file through core LoraLoaderModelOnly equals the Trainer's MODEL with every key loaded, and
the Sampler Preview node, core KSampler and the in-training previews render.

Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_workflows import env, rel_diff  # noqa: F401 (env is a fixture)
from tiny_zimage import write_tiny_zimage, zimage_detection
from workflow_harness import comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

UNET, VAE = "tiny_zimage.safetensors", "tiny_flux1_vae.safetensors"
CAP_WIDTH = 64  # the tiny model's caption width (Qwen3-4B: 2560)
STEPS = 24


def _write_toy_dataset(folder) -> None:
    """Three smooth colour ramps (learnable), captions with the trigger word."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    for i, colour in enumerate(((1.0, 0.3, 0.1), (0.2, 0.8, 0.3), (0.1, 0.3, 1.0))):
        img = ramp[None, :, None] * np.asarray(colour, dtype=np.float32)[None, None, :] * np.ones((64, 1, 1), np.float32)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"ramp{i}.png")
        (folder / f"ramp{i}.txt").write_text(f"xyzstyle, ramp {i}", encoding="utf-8")


def _graph(env, output_name: str) -> dict:  # noqa: F811
    graph = use_test_conditioning(load_api_workflow("zimage_style_lora"), width=CAP_WIDTH, pooled=0)
    graph = shrink(graph, unet=UNET, vae=VAE, dataset=env.input / "zimage_dataset", output_name=output_name,
                   steps=STEPS, preview_every=12)
    graph[nodes_of(graph, "FlowTrainTrainer")[0]]["inputs"].update(learning_rate=1e-2, shift=3.0)
    return graph


def _flow_loss(patcher, vae, folder) -> tuple[float, torch.Tensor]:
    """(the flow-matching loss of ``patcher`` on the training images at fixed σ and noise, with
    the Trainer's conditioning (test node 900: seed 1, 7 tokens); its velocities)."""
    import comfy.model_management as mm

    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
                          for p in sorted(folder.glob("*.png"))])
    g = torch.Generator().manual_seed(1)
    context = torch.randn(1, 7, CAP_WIDTH, generator=g)
    mm.load_models_gpu([patcher], force_full_load=True)
    losses, velocities = [], []
    with torch.inference_mode():
        x0 = patcher.model.process_latent_in(vae.encode(pixels)).float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        for s in (0.2, 0.4, 0.6, 0.8):
            x_t = (1 - s) * x0 + s * noise
            sigma = torch.full((x0.shape[0],), s)
            denoised = patcher.model.apply_model(x_t, sigma, c_crossattn=context.expand(x0.shape[0], -1, -1),
                                                 num_tokens=7).float()
            v = (x_t - denoised) / s
            losses.append(torch.mean((v - (noise - x0)) ** 2).item())
            velocities.append(v.clone())
    return float(np.mean(losses)), torch.stack(velocities)


def test_zimage_workflow_trains_saves_and_previews(env, caplog):  # noqa: F811
    import folder_paths
    import harness
    import nodes

    from trainer_core.lora.io import load_lora_file

    if not (env.models / UNET).exists():
        write_tiny_zimage(env.models / UNET, cap_dim=CAP_WIDTH, seed=11)
    if not (env.models / VAE).exists():
        harness.write_tiny_vae(env.models / VAE, "flux1")
    _write_toy_dataset(env.input / "zimage_dataset")
    output_name = "wf_zimage"
    graph = _graph(env, output_name)
    with zimage_detection():
        ex, stub = harness.run_prompt(graph)
        assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
        out = lambda nid: ex.caches.outputs.get_local(nid).outputs  # noqa: E731
        trainer = nodes_of(graph, "FlowTrainTrainer")[0]
        trained_model, lora, lora_path, _ = (slot[0] for slot in out(trainer))
        base = out(nodes_of(graph, "UNETLoader")[0])[0][0]
        vae = out(nodes_of(graph, "VAELoader")[0])[0][0]
        with caplog.at_level(logging.WARNING):
            from_file = nodes.LoraLoaderModelOnly().load_lora_model_only(base, f"{output_name}.safetensors", 1.0)[0]
        bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
        folder = env.input / "zimage_dataset"
        (loss_base, v_base), (loss_trained, v_trained), (loss_file, v_file) = (
            _flow_loss(m, vae, folder) for m in (base, trained_model, from_file))

    # the file: ComfyUI's own NextDiT names, musubi's Z-Image metadata
    assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in lora
    md = load_lora_file(lora_path)[1]
    assert md["ss_base_model_version"] == "z_image" and md["modelspec.architecture"] == "Z-Image/lora"
    assert md["ss_network_module"] == "networks.lora_zimage" and md["flowtrain.arch"] == "zimage"
    assert md["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
    assert f"{output_name}.safetensors" in folder_paths.get_filename_list("loras")

    # every key loaded; base + file == the Trainer's MODEL; training lowered the loss
    assert not bad and len(from_file.patches) == len(lora) // 2
    assert rel_diff(v_file, v_trained) <= 1e-3
    assert loss_trained < 0.9 * loss_base, (loss_base, loss_trained)
    logging.getLogger(__name__).info("Z-Image toy flow loss: base %.4f → trained %.4f; file vs MODEL rel diff %.2e; "
                                     "LoRA moves the output by %.2e", loss_base, loss_trained,
                                     rel_diff(v_file, v_trained), rel_diff(v_trained, v_base))

    # previews: the Sampler Preview node, core KSampler on the trained MODEL, in-training previews
    images = out(nodes_of(graph, "FlowTrainSamplerPreview")[0])[0][0]
    assert images.ndim == 4 and images.shape[1:] == (64, 64, 3) and torch.isfinite(images).all()
    assert ex.history_result["outputs"][nodes_of(graph, "FlowTrainSamplerPreview")[0]]["images"]
    assert ex.history_result["outputs"][nodes_of(graph, "SaveImage")[-1]]["images"]
    run_dir = env.output / "flowtrain" / output_name
    assert sorted(p.name for p in (run_dir / "previews" / "final").glob("*.png")) == ["p0_plain.png", "p0_trigger.png"]
