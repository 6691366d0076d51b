"""LoRA training on ComfyUI quantized base weights (``comfy_quant`` fp8-scaled files), real ComfyUI.

The files are tiny FLUX.1/FLUX.2 models quantized by ComfyUI's own code
(``harness.quantize_state_dict``) and loaded like UNETLoader, so every block linear is a
``MixedPrecisionOps.Linear`` holding a ``QuantizedTensor`` (fp8 data + scale) as an inference
tensor. Skipped unless COMFYUI_PATH is set.
"""
from __future__ import annotations

import pytest
import harness
import torch

from test_bridge import EXPECTED, _batch, _loss, _steps, _train
from trainer_core.config import LoRAConfig
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux

CASES = {  # name: (tiny file kind, marker)
    "flux1_dev": ("flux1_dev", "layer"),
    "flux2": ("flux2", "layer"),
    "flux2_dev_header": ("flux2_dev", "header"),
}


@pytest.fixture(scope="session")
def quant_files(comfyui, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux_fp8")
    seeds = {"flux1_dev": 1, "flux2": 3, "flux2_dev": 4}
    out = {}
    for name, (kind, marker) in CASES.items():
        arch, _, guidance, _ = EXPECTED[kind]
        out[name] = comfyui.write_tiny_flux_quantized(root / f"{name}.safetensors", arch, marker=marker,
                                                      guidance=guidance, seed=seeds[kind])
    return out


def _quantized(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from comfy.quant_ops import QuantizedTensor

    return {n: m.weight for n, m in module.named_modules()
            if isinstance(getattr(m, "weight", None), QuantizedTensor)}


def _load(comfyui, path):
    import comfy.model_management as mm

    mp = comfyui.load_flux(path)
    with torch.inference_mode():
        mm.load_models_gpu([mp], force_full_load=True)
    return mp


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_file_loads_with_fp8_block_weights(comfyui, bridge, quant_files, name):
    mp = comfyui.load_flux(quant_files[name])
    q = _quantized(mp.model.diffusion_model)
    depth = len(mp.model.diffusion_model.double_blocks), len(mp.model.diffusion_model.single_blocks)
    per_double = 10 if name.startswith("flux1") else 8  # FLUX.1 adds the img/txt modulation linears
    per_single = 3 if name.startswith("flux1") else 2
    assert len(q) == depth[0] * per_double + depth[1] * per_single
    assert all(w._qdata.dtype == torch.float8_e4m3fn for w in q.values())
    assert bridge.quantized_layers(mp.model.diffusion_model) == len(q)


@pytest.mark.parametrize("name", list(CASES))
def test_lora_trains_on_quantized_weights(comfyui, bridge, quant_files, name):
    mp = _load(comfyui, quant_files[name])
    dm = mp.model.diffusion_model
    before = {n: (w, w._qdata.clone(), w.is_inference()) for n, w in _quantized(dm).items()}
    with bridge.training_model(mp, harness.bridge_config(True, precision="bf16")) as model:
        live = _quantized(model.module)
        assert set(live) == set(before)
        assert all(w._qdata.dtype == torch.float8_e4m3fn and not w.is_inference() for w in live.values())
        losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    after = _quantized(dm)
    for n, (w, data, inference) in before.items():  # the MODEL's own objects and values are back
        assert after[n] is w and w.is_inference() == inference and torch.equal(w._qdata.view(torch.uint8), data.view(torch.uint8)), n


def test_autograd_keeps_no_dequantized_weight(comfyui, bridge, quant_files):
    """Whatever autograd saves for backward (no checkpointing, so every layer's saves are
    seen; block checkpointing saves the same per block while it recomputes) is activations,
    LoRA weights or the quantized weights themselves: no tensor of a quantized layer's
    [out, in] shape (or its transpose) in a floating dtype (a dequantized or merged copy)."""
    from comfy.quant_ops import QuantizedTensor

    mp = _load(comfyui, quant_files["flux1_dev"])
    saved = []

    def pack(t):
        saved.append((type(t), tuple(t.shape), t.dtype))
        return t

    with bridge.training_model(mp, harness.bridge_config(False, precision="bf16")) as model:
        shapes = {s for w in _quantized(model.module).values() for s in (tuple(w.shape), tuple(w.shape)[::-1])}
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _loss(model, _batch("flux1")).backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
        finally:
            net.remove()
    assert len(saved) > 50
    full = [(s, d) for kind, s, d in saved if kind is not QuantizedTensor and s in shapes and d.is_floating_point]
    assert not full, full


@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_lora_from_quantized_model_loads_in_comfy_and_matches(comfyui, bridge, quant_files, name):
    """The saved file loads through ComfyUI's LoRA loader with every key used, and the MODEL
    it gives reproduces the trained model's LoRA effect. ComfyUI applies a LoRA to an fp8
    weight by requantizing W + ΔW, so the comparison allows for fp8 rounding."""
    import comfy.model_management as mm

    arch = EXPECTED[CASES[name][0]][0]
    mp = _load(comfyui, quant_files[name])
    batch = _batch(arch, seed=5)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])
        with torch.no_grad():
            base = model.velocity(*batch[:3], 1.0)
            g = torch.Generator().manual_seed(1)
            for p in net.parameters():  # ΔW about W's size: ComfyUI requantizes W + ΔW (stochastic
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)  # rounding), an error that grows with ΔW
            live = model.velocity(*batch[:3], 1.0)
        tensors = LORA_FORMATS.get(model.lora_format).to_tensors(net, model)
        trained = len(net.modules_trained())
        net.remove()
    with_lora = bridge.model_with_lora(mp, tensors)  # raises on any key ComfyUI did not load
    assert len(with_lora.patches) == trained
    with torch.inference_mode():
        mm.load_models_gpu([with_lora], force_full_load=True)
        again = BflFlux(with_lora.model.diffusion_model, arch=model.arch, guidance_embed=model.guidance_embed,
                        latent_channels=model.latent_channels, patch_size=model.patch_size,
                        context_tokens=model.context_tokens, compute_dtype=model.compute_dtype)
        from_file = again.velocity(*batch[:3], 1.0)
    effect = (live - base).abs().max()
    assert effect > 0.1 * live.abs().max()
    assert (from_file - live).abs().max() <= 0.1 * effect, ((from_file - live).abs().max(), effect)


def test_quantized_model_comes_back_as_nodes_load_it(comfyui, bridge, quant_files):
    """A MODEL not yet on its device (the Trainer is often the first node to load it) is
    loaded by ``training_model`` as every node loads it, inside inference mode: after
    training its weights are inference tensors again, so the next node (a sampler, in
    inference mode) can move and patch them. Loaded outside inference mode, ComfyUI's
    quantized layers turn their weights into normal tensors, and ``nn.Parameter`` of such a
    ``QuantizedTensor`` inside inference mode fails ("Cannot set version_counter for
    inference tensor") when the sampler's ``unpatch_model`` moves the model."""
    mp = comfyui.load_flux(quant_files["flux2"])  # as UNETLoader leaves it: not loaded yet
    dm = mp.model.diffusion_model
    before = {n: p.is_inference() for n, p in dm.named_parameters()}
    assert all(before.values()) and _quantized(dm)
    with bridge.training_model(mp, harness.bridge_config(True, precision="bf16")) as model:
        losses = _train(model, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {n: p.is_inference() for n, p in dm.named_parameters()} == before
    with torch.inference_mode():
        mp.model.to(mp.offload_device)  # what the next node's load does first (unpatch_model)
    assert all(w.is_inference() for w in _quantized(dm).values())


@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_streamed_training_of_quantized_weights_is_the_same(comfyui, bridge, quant_files, name):
    """memory.streaming='all' on a ``comfy_quant`` model (storage and compute both the CPU):
    the streamer copies each block's ``QuantizedTensor`` weights (still quantized) around
    its use, the LoRA trains to bitwise the same losses and weights as without streaming,
    the ledger stays within the plan's weight limit and ends at the resident bytes, and the
    MODEL's quantized weights are the same objects and values afterwards."""
    from comfy.quant_ops import QuantizedTensor

    from trainer_core.config import MemoryConfig

    results = {}
    for streaming in ("off", "all"):
        mp = _load(comfyui, quant_files[name])
        dm = mp.model.diffusion_model
        before = {n: (w, w._qdata.clone()) for n, w in _quantized(dm).items()}
        config = harness.bridge_config("blocks", precision="bf16", memory=MemoryConfig(streaming=streaming))
        with bridge.training_model(mp, config) as model:
            plan = model.memory_plan
            torch.manual_seed(0)
            net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=4.0), model.default_targets["all"])
            model.apply_memory_plan(plan)
            copied = []
            if model.streamer is not None:  # what the streamer puts in the slots: quantized copies
                block = model.streamer.blocks[plan.streamed[0]]
                with model.streamer.use(plan.streamed[0]):
                    copied = [m.weight._qdata.dtype for m in block.modules()
                              if isinstance(getattr(m, "weight", None), QuantizedTensor)]
            losses = _steps(model, net)
            ledger = (model.streamer.ledger.peak, model.streamer.ledger.current, model.streamer._resident,
                      model.streamer.fetches) if model.streamer is not None else None
            lora = {k: v.detach().clone() for k, v in net.state_dict().items()}
            net.remove()
        results[streaming] = (losses, lora, plan, ledger, copied)
        after = _quantized(dm)
        for n, (w, data) in before.items():
            assert after[n] is w and torch.equal(w._qdata.view(torch.uint8), data.view(torch.uint8)), n
    losses, lora, plan, (peak, current, resident, fetches), copied = results["all"]
    assert len(plan.streamed) == plan.blocks and results["off"][2].streamed == ()
    assert copied and set(copied) == {torch.float8_e4m3fn}
    assert fetches >= 3 * plan.blocks * 2 and 0 < peak <= plan.weight_limit and current == resident
    assert losses == results["off"][0] and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(lora[k], results["off"][1][k]) for k in lora)
