"""Reference latents (edit models) in real ComfyUI: the engine's adapter predicts what ComfyUI's
own sampler path predicts for the same weights, latents, references, σ and conditioning.

ComfyUI side: a CONDITIONING through the core ``ReferenceLatent`` node (and
``FluxKontextMultiReferenceLatentMethod`` for a chosen method), ``encode_model_conds``
(``Flux.extra_conds`` turns it into ``ref_latents``) and ``calc_cond_batch`` (which runs
``model.apply_model``), exactly as KSampler does. Engine side: ``BflFlux.velocity`` with the
model-space reference latents. FLUX.1 (the Kontext layout: Kontext loads as FLUX.1-dev) and
FLUX.2 (Klein-like and dev), one and two references, every placement method.

Skipped unless COMFYUI_PATH is set."""
from __future__ import annotations

import pytest
import torch

import harness

from trainer_core.types import TextBatch

CASES = [  # (tiny file, method or None = the model's default, reference latent sizes)
    ("flux1_dev", None, [(8, 8)]),
    ("flux1_dev", None, [(8, 8), (6, 10)]),
    ("flux1_dev", "index", [(8, 8), (6, 10)]),
    ("flux1_dev", "uxo", [(8, 8), (4, 4)]),
    ("flux2", None, [(4, 4)]),
    ("flux2", None, [(4, 4), (3, 5)]),
    ("flux2", "offset", [(4, 4), (3, 5)]),
    ("flux2_dev", None, [(4, 4), (2, 2)]),
]


STD = {"flux1": 0.02, "flux2": 0.15}
"""Weight scale of the tiny models: at the harness default (0.02) the tiny FLUX.2 barely reacts to
its input (references move its output by ~2e-5 relative), which would let a dropped reference pass."""


@pytest.fixture(scope="module")
def edit_files(comfyui, tmp_path_factory):
    import harness
    from workflow_harness import comfy_env

    # ComfyUI's nodes, loaded the way the workflow tests load them (with FlowTrain as a custom node
    # pack): nodes load once per process, so loading them without the pack here would break those tests
    comfy_env(tmp_path_factory.mktemp("comfy"))
    root = tmp_path_factory.mktemp("tiny_edit")
    return {name: harness.write_tiny_flux(root / f"{name}.safetensors", name[:5], guidance=name != "flux2",
                                          seed=i, std=STD[name[:5]])
            for i, name in enumerate(("flux1_dev", "flux2", "flux2_dev"))}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(arch: str, ref_sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, hw = (16, 8) if arch == "flux1" else (128, 4)
    x = torch.randn(1, c, hw, hw, generator=g)
    raw_refs = [torch.randn(1, c, h, w, generator=g) for h, w in ref_sizes]
    ctx = torch.randn(1, 7, 64, generator=g)
    pooled = torch.randn(1, 32, generator=g) if arch == "flux1" else None
    return x, raw_refs, ctx, pooled


def comfy_velocity(patcher, x, sigma: float, ctx, pooled, raw_refs, method, guidance: float) -> torch.Tensor:
    """(x - x0) / σ with x0 from ComfyUI's sampler path for this conditioning."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    import nodes

    extra = {"guidance": guidance}
    if pooled is not None:
        extra["pooled_output"] = pooled
    cond = [[ctx, extra]]
    for raw in raw_refs:
        cond = nodes.NODE_CLASS_MAPPINGS["ReferenceLatent"].execute(cond, {"samples": raw}).result[0]
    if method is not None:
        node = nodes.NODE_CLASS_MAPPINGS["FluxKontextMultiReferenceLatentMethod"]
        cond = node.execute(cond, "uxo/uno" if method == "uxo" else method).result[0]
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.inference_mode():
        conds = comfy.sampler_helpers.convert_cond(cond)
        conds = comfy.samplers.encode_model_conds(patcher.model.extra_conds, conds, x, x.device, "positive")
        assert ("ref_latents" in conds[0]["model_conds"]) == bool(raw_refs)
        patcher.pre_run()  # what the sampler does before its first step
        try:
            x0 = comfy.samplers.calc_cond_batch(patcher.model, [conds], x, torch.tensor([sigma]), {})[0]
        finally:
            patcher.cleanup()
    return ((x - x0) / sigma).float().clone()


@pytest.mark.parametrize("name,method,ref_sizes", CASES)
def test_adapter_references_match_comfyui(bridge, edit_files, name, method, ref_sizes):
    import harness

    patcher = harness.load_flux(edit_files[name])
    arch = "flux1" if name.startswith("flux1") else "flux2"
    x, raw_refs, ctx, pooled = _inputs(arch, ref_sizes)
    sigma, guidance = 0.6, 1.0
    expected = comfy_velocity(patcher, x, sigma, ctx, pooled, raw_refs, method, guidance)
    without = comfy_velocity(patcher, x, sigma, ctx, pooled, [], None, guidance)
    with torch.inference_mode():
        refs = [patcher.model.process_latent_in(r).clone() for r in raw_refs]  # what the engine caches
    with bridge.training_model(patcher, harness.bridge_config(False, precision="fp32")) as model, torch.no_grad():
        model.reference_method = method
        got = model.velocity(x, torch.tensor([sigma]), TextBatch(ctx, pooled), guidance, references=refs)
        model.reference_method = None
        default = model.velocity(x, torch.tensor([sigma]), TextBatch(ctx, pooled), guidance, references=refs)
    diff = rel_diff(got, expected)
    print(f"{name} {method or 'default'} refs {ref_sizes}: rel diff {diff:.2e} "
          f"(references change the output by {rel_diff(expected, without):.2e})")
    assert got.shape == x.shape
    assert diff <= 1e-4
    assert rel_diff(expected, without) > 1e-3  # the comparison would see references being ignored
    if method is not None:  # ... and a method being ignored
        assert rel_diff(default, expected) > 1e-5, rel_diff(default, expected)


@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_training_with_references_lowers_the_loss(bridge, edit_files, name):
    """A LoRA trained through the adapter with reference latents (checkpointed blocks, the
    training path) learns a fixed edit: the target is the reference with its channels negated."""
    import harness
    import torch.nn.functional as F

    from trainer_core.config import LoRAConfig
    from trainer_core.flow import interpolate, velocity_target
    from trainer_core.lora.network import LoraNetwork

    patcher = harness.load_flux(edit_files[name])
    arch = "flux1" if name.startswith("flux1") else "flux2"
    g = torch.Generator().manual_seed(3)
    c, hw = (16, 8) if arch == "flux1" else (128, 4)
    ref = torch.randn(2, c, hw, hw, generator=g)
    x0, noise = -ref, torch.randn(2, c, hw, hw, generator=g)
    sigma = torch.tensor([0.4, 0.7])
    text = TextBatch(torch.randn(2, 7, 64, generator=g), torch.randn(2, 32, generator=g) if arch == "flux1" else None)
    x_t, target = interpolate(x0, noise, sigma), velocity_target(x0, noise)
    with bridge.training_model(patcher, harness.bridge_config(True, precision="fp32")) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=4.0), model.default_targets["all"])
        opt = torch.optim.AdamW(net.parameters(), lr=5e-2)
        losses = []
        try:
            for _ in range(8):
                loss = F.mse_loss(model.velocity(x_t, sigma, text, 1.0, references=[ref]), target)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        finally:
            net.remove()
    print(f"{name} edit training: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.9 * losses[0], losses
