"""Chroma in real ComfyUI: detection, conditioning, a frozen modulation network, and a LoRA
trained by the Trainer node that core LoraLoaderModelOnly applies with every key.

The tiny Chroma file (``harness.chroma_state_dict``) is recognised by ComfyUI's own model
detection; ``harness.chroma_detection`` only reads the approximator's widths from the file
(ComfyUI fixes them to the released model's). Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import logging

import pytest
import torch

import harness
from trainer_core.config import LoRAConfig
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.io import load_lora_file
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux
from trainer_core.types import TextBatch

APPROXIMATOR = "distilled_guidance_layer"


@pytest.fixture(scope="module")
def chroma_file(comfyui, tmp_path_factory):
    return harness.write_tiny_chroma(tmp_path_factory.mktemp("chroma") / "tiny_chroma.safetensors")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    return x, torch.tensor([0.6]), torch.randn(1, 7, 64, generator=g), torch.randn(1, 32, generator=g)


def test_detected_as_chroma(comfyui, bridge, chroma_file):
    import comfy.model_base

    patcher = comfyui.load_flux(chroma_file)
    assert type(patcher.model) is comfy.model_base.Chroma
    info = bridge.detect_arch(patcher)
    assert (info.arch, info.guidance_embed, info.latent_channels, info.patch_size, info.model_type_name) == \
        ("chroma", False, 16, 2, "Chroma")


def test_other_flux_subclasses_are_refused(comfyui, bridge):
    """Exact classes only: Chroma Radiance subclasses Chroma but works on pixels."""
    with pytest.raises(ValueError, match=r"trains FLUX.1, FLUX.2, Chroma(, [^;]+)? models; the MODEL input is a ChromaRadiance"):
        bridge.detect_arch(harness.stub_model("ChromaRadiance"))


def test_velocity_is_what_comfyui_samples_with(comfyui, bridge, chroma_file):
    """T5 context as encoded (no padding), no pooled vector, guidance 0: the conditioning
    ComfyUI's sampler builds (``Chroma.extra_conds``) gives the same velocity. A pooled vector
    in the text batch is ignored."""
    import comfy.model_management as mm

    patcher = comfyui.load_flux(chroma_file)
    x, sigma, context, pooled = _inputs()
    base = patcher.model
    with torch.inference_mode():
        mm.load_models_gpu([patcher], force_full_load=True)
        conds = base.extra_conds(noise=x, cross_attn=context, pooled_output=pooled, device=x.device)
        assert float(conds["guidance"].cond) == 0.0
        kwargs = {k: c.cond for k, c in conds.items()}
        comfy_v = ((x - base.apply_model(x, sigma, **kwargs)) / sigma).float().clone()
    with bridge.training_model(patcher, harness.bridge_config(False)) as model:
        assert model.context_tokens is None and not model.family.pooled
        with torch.no_grad():
            ours = model.velocity(x, sigma, TextBatch(context, pooled), guidance=3.5)
            no_pooled = model.velocity(x, sigma, TextBatch(context, None))
    assert torch.equal(ours, no_pooled)
    assert (ours - comfy_v).abs().max() <= 1e-4 * comfy_v.abs().max()


def test_modulation_network_frozen_unless_targeted(comfyui, bridge, chroma_file):
    patcher = comfyui.load_flux(chroma_file)
    with bridge.training_model(patcher, harness.bridge_config(True)) as model:
        before = {n: p.detach().clone() for n, p in model.module.named_parameters() if n.startswith(APPROXIMATOR)}
        for preset in ("attention", "all"):
            net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets[preset])
            assert net.modules_trained() and not [n for n in net.modules_trained() if n.startswith(APPROXIMATOR)]
            net.remove()
        # targeted explicitly: trains, saves keys ComfyUI applies, and the file reproduces the model
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), rf"{APPROXIMATOR}\.layers\.\d+\.(?:in_layer|out_layer)")
        assert len(net.modules_trained()) == 4
        x, sigma, context, _ = _inputs(1)
        loss = model.velocity(x, sigma, TextBatch(context, None)).square().mean()
        loss.backward()
        grads = [p.grad for n, p in net.named_parameters() if "lora_B" in n]  # A's is 0 while B = 0
        assert len(grads) == 4 and all(g is not None and g.abs().max() > 0 for g in grads)
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            live = model.velocity(x, sigma, TextBatch(context, None))
        tensors = LORA_FORMATS.get(model.lora_format).to_tensors(net, model)
        net.remove()
        after = {n: p.detach() for n, p in model.module.named_parameters() if n.startswith(APPROXIMATOR)}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(k.startswith(f"lora_unet_{APPROXIMATOR}_layers_") for k in tensors)
    with_lora = bridge.model_with_lora(patcher, tensors)  # raises on any key ComfyUI did not load
    assert len(with_lora.patches) == 4
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu([with_lora], force_full_load=True)
        again = BflFlux(with_lora.model.diffusion_model, arch="chroma", guidance_embed=False, latent_channels=16,
                        patch_size=2)
        from_file = again.velocity(x, sigma, TextBatch(context, None))
    assert (from_file - live).abs().max() <= 1e-3 * live.abs().max()


# ---------------------------------------------------------------------- the Trainer node
def _denoise(patcher) -> torch.Tensor:
    """σ·velocity = x - ``apply_model`` on fixed inputs (guidance 0, as ``Chroma.extra_conds``)."""
    import comfy.model_management

    x, sigma, context, _ = _inputs(3)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.inference_mode():
        return (x - patcher.model.apply_model(x, sigma, c_crossattn=context,
                                              guidance=torch.tensor([0.0]))).float().clone()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_trainer_node_saves_a_chroma_lora_comfyui_applies(tmp_path_factory, caplog):
    from workflow_harness import comfy_env, comfy_path, load_api_workflow, nodes_of, shrink, use_test_conditioning, \
        write_dataset

    if comfy_path() is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout")
    env = comfy_env(tmp_path_factory.mktemp("comfy_chroma"))
    import folder_paths
    import nodes

    unet, vae = "tiny_chroma.safetensors", "tiny_chroma_vae.safetensors"
    harness.write_tiny_chroma(env.models / unet)
    harness.write_tiny_vae(env.models / vae, "flux1")  # Chroma uses the FLUX.1 VAE
    dataset = write_dataset(env.input / "flowtrain_chroma_dataset")
    graph = use_test_conditioning(load_api_workflow("flux1_dev_subject_lora"), width=64, pooled=0)
    graph = shrink(graph, unet=unet, vae=vae, dataset=dataset, output_name="wf_chroma", steps=4)
    with harness.chroma_detection():
        reference = _denoise(harness.load_flux(env.models / unet))
        ex, stub = harness.run_prompt(graph)
        assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
        out = lambda nid: ex.caches.outputs.get_local(nid).outputs  # noqa: E731
        trained_model, _lora, lora_path, _curve = (slot[0] for slot in out(nodes_of(graph, "FlowTrainTrainer")[0]))
        base = out(nodes_of(graph, "UNETLoader")[0])[0][0]
        assert "wf_chroma.safetensors" in folder_paths.get_filename_list("loras")
        with caplog.at_level(logging.WARNING):
            from_file = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "wf_chroma.safetensors", 1.0)[0]
        bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("lora key not loaded", "NOT LOADED"))]
        tensors, md = load_lora_file(lora_path)
        assert not bad and len(from_file.patches) == len(tensors) // 3  # down, up, alpha per module
        y_trained, y_file, y_base = _denoise(trained_model), _denoise(from_file), _denoise(base)
    assert all(k.startswith("lora_unet_") and APPROXIMATOR not in k for k in tensors)
    assert _rel(y_file, y_trained) <= 1e-3
    assert _rel(y_trained, y_base) > 1e-4, "the trained LoRA does not change the output"
    assert _rel(y_base, reference) <= 1e-6
    # SCALE-FAMILIES-FACTS §9.1: what sd-scripts writes for a Chroma LoRA
    assert {k: md[k] for k in ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                               "ss_model_type", "ss_network_module", "modelspec.sai_model_spec", "flowtrain.arch")} == {
        "ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora",
        "modelspec.implementation": "https://huggingface.co/lodestones/Chroma", "ss_model_type": "chroma",
        "ss_network_module": "networks.lora_flux", "modelspec.sai_model_spec": "1.0.1", "flowtrain.arch": "chroma"}
    events = [d for e, d, _ in stub.messages if e == "flowtrain.progress"]
    assert [d["step"] for d in events] == [1, 2, 3, 4]
