"""nodes/bridge on real ComfyUI (in-process, CPU) with tiny random FLUX models.

Skipped unless COMFYUI_PATH is set. Models are loaded the way UNETLoader does inside a prompt
(under ``torch.inference_mode``), so their weights are inference tensors.
"""
from __future__ import annotations

import logging

import pytest
import harness
import torch
import torch.nn.functional as F

from trainer_core.config import LoRAConfig
from trainer_core.flow import interpolate, velocity_target
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux
from trainer_core.types import TextBatch

EXPECTED = {  # name: (arch, latent channels, guidance_embed, ComfyUI config class)
    "flux1_dev": ("flux1", 16, True, "Flux"),
    "flux1_schnell": ("flux1", 16, False, "FluxSchnell"),
    "flux2": ("flux2", 128, False, "Flux2"),          # Klein: no guidance embedding
    "flux2_dev": ("flux2", 128, True, "Flux2"),       # FLUX.2-dev: guidance-distilled
}


def _batch(arch: str, seed: int = 0, b: int = 2):
    """(x_t, sigma, text, target) for a 64 px image: 16 image tokens in both layouts."""
    g = torch.Generator().manual_seed(seed)
    c, hw = (16, 8) if arch == "flux1" else (128, 4)
    x0, noise = torch.randn(b, c, hw, hw, generator=g), torch.randn(b, c, hw, hw, generator=g)
    sigma = torch.rand(b, generator=g) * 0.8 + 0.1
    text = TextBatch(torch.randn(b, 7, 64, generator=g), torch.randn(b, 32, generator=g) if arch == "flux1" else None)
    return interpolate(x0, noise, sigma), sigma, text, velocity_target(x0, noise)


def _loss(model: BflFlux, batch) -> torch.Tensor:
    x_t, sigma, text, target = batch
    return F.mse_loss(model.velocity(x_t, sigma, text, 1.0), target)


def _train(model: BflFlux, steps: int = 6, lr: float = 1e-2, rank: int = 4,
           lora: LoRAConfig | None = None) -> list[float]:
    """A few AdamW steps of a rank-``rank`` LoRA (or the adapter ``lora`` describes) on one
    fixed batch; removes the LoRA. The adapter's parameters train in fp32 (asserted)."""
    lora = lora if lora is not None else LoRAConfig(rank=rank, alpha=float(rank))
    net = LoraNetwork.inject(model.module, lora, model.default_targets["all"])
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    try:
        return _steps(model, net, steps, lr)
    finally:
        net.remove()


def _steps(model: BflFlux, net: LoraNetwork, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of ``net`` on ``_batch(model.arch)``; the losses."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    batch, losses = _batch(model.arch), []
    for _ in range(steps):
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _load(comfyui, path, **kw):
    import comfy.model_management as mm  # noqa: F811  (the package, not the fixture)

    mp = comfyui.load_flux(path, **kw)
    with torch.inference_mode():
        mm.load_models_gpu([mp], force_full_load=True)
    return mp


# ---------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", list(EXPECTED))
def test_detect_arch(comfyui, bridge, tiny_files, name):
    arch, channels, guidance, kind = EXPECTED[name]
    info = bridge.detect_arch(comfyui.load_flux(tiny_files[name]))
    assert info == bridge.ArchInfo(arch, guidance, channels, 2 if arch == "flux1" else 1, kind)


def test_detect_arch_refuses_other_models(comfyui, bridge):
    with pytest.raises(ValueError, match=r"FlowTrain trains FLUX.1, FLUX.2(, [^;]+)? models; the MODEL input is a SDXL"):
        bridge.detect_arch(harness.stub_model("SDXL"))


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("name", list(EXPECTED))
def test_lora_training_lowers_loss(comfyui, bridge, tiny_files, name):
    import comfy.model_management as mm

    mp = comfyui.load_flux(tiny_files[name])
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        assert mm.in_training and model.arch == EXPECTED[name][0] and model.checkpoint == "blocks"
        assert model.context_tokens == (512 if model.arch == "flux2" else None)
        losses = _train(model)
    assert not mm.in_training
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_checkpoint_modes_give_equal_gradients(comfyui, bridge, tiny_files, name):
    mp = comfyui.load_flux(tiny_files[name])
    with bridge.training_model(mp, harness.bridge_config("off")) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        grads = {}
        for mode in ("off", "blocks", "selective"):
            model.checkpoint = mode
            _loss(model, _batch(model.arch)).backward()
            grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
            for p in net.parameters():
                p.grad = None
        net.remove()
    assert grads["off"].abs().max() > 0
    for mode in ("blocks", "selective"):
        assert (grads[mode] - grads["off"]).abs().max() <= 1e-5, mode


def test_input_model_is_unchanged_after_training(comfyui, bridge, tiny_files):
    mp = _load(comfyui, tiny_files["flux1_dev"])
    dm = mp.model.diffusion_model
    before = {n: (p, p.detach().clone(), p.dtype, p.requires_grad, p.is_inference()) for n, p in dm.named_parameters()}
    assert all(v[4] for v in before.values())  # loaded like UNETLoader in a prompt: inference tensors
    x_t, sigma, text, _ = _batch("flux1")

    def run():
        with torch.inference_mode():
            return dm(x_t, sigma, text.context, y=text.pooled, guidance=torch.ones(2)).clone()

    out_before = run()
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        _train(model, steps=2)
    after = dict(dm.named_parameters())
    assert list(after) == list(before)
    for n, (p, value, dtype, flag, inference) in before.items():
        assert after[n] is p and p.dtype == dtype and p.requires_grad == flag and p.is_inference() == inference, n
        assert torch.equal(p.detach(), value), n
    assert torch.equal(run(), out_before)


def test_errors_inside_training_restore_the_model(comfyui, bridge, tiny_files):
    import comfy.model_management as mm
    from peft.tuners.tuners_utils import BaseTunerLayer

    mp = _load(comfyui, tiny_files["flux1_schnell"])
    dm = mp.model.diffusion_model
    qkv = dm.double_blocks[0].img_attn.qkv
    with pytest.raises(KeyboardInterrupt):
        with bridge.training_model(mp, harness.bridge_config(False)) as model:
            LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])  # never removed
            raise KeyboardInterrupt
    assert not mm.in_training
    assert not any(isinstance(m, BaseTunerLayer) for m in dm.modules())
    assert dm.double_blocks[0].img_attn.qkv is qkv and qkv.weight.is_inference()


def test_fp8_weights_train(comfyui, bridge, tiny_files):
    mp = comfyui.load_flux(tiny_files["flux1_dev"], dtype=torch.float8_e4m3fn)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        qkv = model.module.double_blocks[0].img_attn.qkv.weight
        assert qkv.dtype == torch.float8_e4m3fn
        losses = _train(model)
        assert qkv.dtype == torch.float8_e4m3fn
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def _random_lora(module: torch.nn.Module, rank: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            out[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return out


def test_training_on_top_of_another_lora(comfyui, bridge, tiny_files):
    mp = comfyui.load_flux(tiny_files["flux2"])
    dm = mp.model.diffusion_model
    w0 = dm.double_blocks[0].img_attn.qkv.weight.detach().clone()
    other = _random_lora(dm)
    patched = bridge.model_with_lora(mp, other)
    a = other["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    b = other["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    with bridge.training_model(patched, harness.bridge_config(True)) as model:
        merged = model.module.double_blocks[0].img_attn.qkv.weight
        assert torch.allclose(merged, w0 + b @ a, atol=1e-6)  # the other LoRA is in the weights we train on
        losses = _train(model)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["flux1_dev", "flux1_schnell", "flux2", "flux2_dev"])
def test_saved_lora_loads_in_comfy_and_matches_live_model(comfyui, bridge, tiny_files, name):
    import comfy.model_management as mm

    mp = comfyui.load_flux(tiny_files[name])
    batch = _batch(EXPECTED[name][0], seed=5)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            live = model.velocity(batch[0], batch[1], batch[2], 1.0)
        tensors = LORA_FORMATS.get(model.lora_format).to_tensors(net, model)
        trained = len(net.modules_trained())
        net.remove()
    assert model.lora_format == ("flux1_kohya" if EXPECTED[name][0] == "flux1" else "flux2_diffusion_model")
    with_lora = bridge.model_with_lora(mp, tensors)  # raises on any key ComfyUI did not load
    assert len(with_lora.patches) == trained
    with torch.inference_mode():
        mm.load_models_gpu([with_lora], force_full_load=True)
        again = BflFlux(with_lora.model.diffusion_model, arch=model.arch, guidance_embed=model.guidance_embed,
                        latent_channels=model.latent_channels, patch_size=model.patch_size,
                        context_tokens=model.context_tokens)
        from_file = again.velocity(batch[0], batch[1], batch[2], 1.0)
    assert (from_file - live).abs().max() <= 1e-3 * live.abs().max()


def test_model_with_lora_refuses_unknown_keys(comfyui, bridge, tiny_files, caplog):
    mp = comfyui.load_flux(tiny_files["flux1_schnell"])
    bad = {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(2, 128),
           "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(384, 2)}
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="did not load 2 LoRA key"):
        bridge.model_with_lora(mp, bad)


# ---------------------------------------------------------------------- codec and text
def test_vae_codec(comfyui, bridge, tiny_files, tiny_vae_file):
    vae = comfyui.load_vae(tiny_vae_file)
    mp = comfyui.load_flux(tiny_files["flux1_dev"])
    codec = bridge.VaeCodec(vae, mp)
    assert codec.downscale == 8 and codec.identity == bridge.VaeCodec(vae, mp).identity
    assert codec.identity.endswith("-Flux")
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (1, 16, 8, 8) and z.dtype == torch.float32 and not z.is_inference()
    with torch.inference_mode():
        raw = vae.encode(((pixels + 1) / 2).movedim(1, -1)).float()
    assert torch.allclose(z, (raw - 0.1159) * 0.3611, atol=1e-5)  # FLUX.1 latent format
    img = codec.decode(z)
    assert img.shape == (1, 3, 64, 64) and img.min() >= -1 and img.max() <= 1


def test_fixed_conditioning_encoder(bridge):
    cond = [[torch.randn(1, 5, 64), {"pooled_output": torch.randn(1, 32)}]]
    other = [[torch.randn(1, 3, 64), {"pooled_output": torch.randn(1, 32)}]]
    enc = bridge.FixedConditioningEncoder(cond, other, select=lambda t: "main" if "sks" in t else "class")
    a, b = enc.encode(["sks dog", "a dog"])
    assert torch.equal(a.context, cond[0][0][0]) and torch.equal(a.pooled, cond[0][1]["pooled_output"][0])
    assert torch.equal(b.context, other[0][0][0])
    assert enc.identity != bridge.FixedConditioningEncoder(other).identity
    assert enc.identity == bridge.FixedConditioningEncoder(cond, other).identity
    with pytest.raises(ValueError, match="must be a \[1, T, D\] tensor"):
        bridge.FixedConditioningEncoder([[torch.zeros(3), {}]])


def test_clip_text_encoder_with_a_stub_clip(bridge):
    """Plumbing only (a real FLUX CLIP needs T5-XXL): the stub answers like comfy.sd.CLIP."""

    class StubClip:
        cond_stage_model = torch.nn.Linear(4, 4)

        def tokenize(self, text):
            return {"len": len(text)}

        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            n = tokens["len"]
            return {"cond": torch.full((1, n, 8), float(n), dtype=torch.bfloat16), "pooled_output": torch.ones(1, 6)}

    e1 = bridge.ClipTextEncoder(StubClip(), "flux1").encode(["abc"])[0]
    assert e1.context.shape == (3, 8) and e1.context.dtype == torch.float32 and e1.pooled.shape == (6,)
    info = bridge.ArchInfo("flux2", False, 128, 1, "Flux2")
    assert bridge.ClipTextEncoder(StubClip(), info).encode(["ab"])[0].pooled is None


def test_auto_precision_trains_low_precision_weights_in_bf16(comfyui, bridge, tiny_files, monkeypatch):
    fp32 = comfyui.load_flux(tiny_files["flux1_dev"])
    bf16 = comfyui.load_flux(tiny_files["flux1_dev"], dtype=torch.bfloat16)
    monkeypatch.setattr(bridge.model, "_bf16_native", lambda device: True)
    assert bridge.auto_compute_dtype(fp32.model) == fp32.model.get_dtype_inference() == torch.float32
    assert bridge.auto_compute_dtype(bf16.model) == torch.bfloat16
    with bridge.training_model(bf16, harness.bridge_config("blocks", precision="auto")) as model:
        assert model.compute_dtype == torch.bfloat16 and model.autocast_dtype is None
        assert model.module.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16  # never cast
    monkeypatch.setattr(bridge.model, "_bf16_native", lambda device: False)  # e.g. a CPU without native bf16
    assert bridge.auto_compute_dtype(bf16.model) == bf16.model.get_dtype_inference()


# ---------------------------------------------------------------------- memory plan and streaming
@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_streamed_training_through_the_bridge_is_bitwise_the_same(comfyui, bridge, tiny_files, name):
    """memory.streaming='all' through ``training_model(config=...)``: every block streams
    (storage and compute both the CPU here), the LoRA trains to exactly the same losses,
    and the MODEL's weights are the same objects and values afterwards."""
    from trainer_core.config import MemoryConfig, TrainingConfig

    results = {}
    for streaming in ("off", "all"):
        mp = comfyui.load_flux(tiny_files[name])
        dm = mp.model.diffusion_model
        before = {n: (p, p.detach().clone()) for n, p in dm.named_parameters()}
        config = TrainingConfig(memory=MemoryConfig(streaming=streaming))
        with bridge.training_model(mp, harness.bridge_config("blocks", memory=config.memory)) as model:
            plan = model.memory_plan
            torch.manual_seed(0)
            net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=4.0), model.default_targets["all"])
            model.apply_memory_plan(plan)
            losses = _steps(model, net)
            fetches = model.streamer.fetches if model.streamer is not None else 0
            net.remove()
        results[streaming] = (losses, fetches, plan)
        after = dict(dm.named_parameters())
        assert all(after[n] is p and torch.equal(p.detach(), v) for n, (p, v) in before.items())
    blocks = results["all"][2].blocks
    assert len(results["all"][2].streamed) == blocks and results["off"][2].streamed == ()
    assert results["all"][1] >= 3 * blocks * 2  # forward + recompute, every step
    assert results["all"][0] == results["off"][0] and results["off"][0][-1] < results["off"][0][0]


def test_bridge_refuses_a_run_that_cannot_fit_before_loading(comfyui, bridge, tiny_files):
    import comfy.model_management as mm

    from trainer_core.budget import MemoryBudgetError
    from trainer_core.config import MemoryConfig, TrainingConfig

    mp = comfyui.load_flux(tiny_files["flux1_dev"])
    loaded = list(mm.current_loaded_models)
    config = TrainingConfig(memory=MemoryConfig(budget_gb=0.001, margin_gb=0.0))
    with pytest.raises(MemoryBudgetError, match="To make it fit"):
        with bridge.training_model(mp, config):
            pass
    assert not any(m.model is mp for m in mm.current_loaded_models if m not in loaded)
    assert not mm.in_training


def test_training_attends_with_sdpa(comfyui, bridge, tiny_files):
    """While training, every block's attention is torch SDPA (fused backward), whatever
    ComfyUI picked for inference on this device (a split attention on a CPU)."""
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    mp = comfyui.load_flux(tiny_files["flux2"])
    with bridge.training_model(mp, harness.bridge_config("off")) as model:
        with Record():
            _train(model, steps=1)
    assert len(seen) == 2  # 1 double + 1 single block


def test_training_uses_the_rope_with_the_transposed_backward(comfyui, bridge, tiny_files):
    """Inside ``training_model`` FLUX's attention rotates with ``trainer_core``'s RoPE while
    training (ComfyUI's own function outside: previews), with the same forward values as
    ComfyUI's training path; afterwards ComfyUI's function is back."""
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management as mm

    original = flux_math.apply_rope
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    pe = flux_math.rope(torch.arange(6.0).reshape(1, 6), 8, 10000).unsqueeze(1)
    mp = _load(comfyui, tiny_files["flux1_dev"])
    calls = []
    with bridge.training_model(mp, harness.bridge_config(False)) as model:
        assert flux_math.apply_rope is not original
        comfy_q, comfy_k = flux_math._apply_rope(q, k, pe)  # ComfyUI's training path
        ours_q, ours_k = flux_math.apply_rope(q, k, pe)
        assert torch.equal(ours_q, comfy_q) and torch.equal(ours_k, comfy_k)
        import trainer_core.models.rope as rope_mod

        real = rope_mod.RotaryEmbedding.apply
        rope_mod.RotaryEmbedding.apply = lambda *a: calls.append(1) or real(*a)
        try:
            _loss(model, _batch(model.arch))
        finally:
            rope_mod.RotaryEmbedding.apply = real
    assert len(calls) == 2  # one joint attention per block (1 double + 1 single)
    assert flux_math.apply_rope is original and mm.in_training is False


@pytest.mark.parametrize("kind", ["dynamic", "quantized"])
def test_gpu_streaming_refusals_name_the_fix_before_loading(comfyui, bridge, tiny_files, tmp_path, monkeypatch, kind):
    """On a GPU, streaming refuses a MODEL on ComfyUI's dynamic VRAM (its patcher cannot be
    patched outside its own loader) and a comfy_quant model (GPU placement of quantized
    tensors has not run), naming the exact fix, before the model is loaded or touched.
    The GPU is emulated: ComfyUI's device says CUDA, nothing reaches CUDA before the refusal."""
    import comfy.model_management as mm

    from trainer_core.config import MemoryConfig, TrainingConfig

    if kind == "quantized":
        path = comfyui.write_tiny_flux_quantized(tmp_path / "q.safetensors", "flux2", guidance=False)
        mp, fix = comfyui.load_flux(path), "fp8_e4m3fn"
    else:
        mp, fix = comfyui.load_flux(tiny_files["flux1_dev"]), "--disable-dynamic-vram"
        monkeypatch.setattr(mp, "is_dynamic", lambda: True)
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    dm = mp.model.diffusion_model
    before = {n: p for n, p in dm.named_parameters()}
    config = TrainingConfig(memory=MemoryConfig(budget_gb=48.0, streaming="all"))
    with pytest.raises(ValueError, match=fix) as err:
        with bridge.training_model(mp, config):
            pass
    assert "blocks streamed" in str(err.value)
    assert not any(m.model is mp for m in mm.current_loaded_models) and mm.in_training is False
    assert all(p is before[n] and p.is_inference() for n, p in dm.named_parameters())
