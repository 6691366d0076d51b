"""Z-Image (ComfyUI's Lumina2/NextDiT model type) through the bridge, on a tiny random model
loaded by ComfyUI's UNETLoader path (``tiny_zimage``). Skipped unless COMFYUI_PATH is set."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import harness
from harness import load_flux as load_zimage
from tiny_zimage import write_tiny_zimage, zimage_state_dict

from trainer_core.config import LoRAConfig
from trainer_core.flow import interpolate, velocity_target
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.zimage import NextDiTZImage
from trainer_core.types import TextBatch


@pytest.fixture(scope="module")
def zimage_file(tmp_path_factory):
    return write_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage") / "zimage.safetensors", seed=7)


def _loaded(comfyui, path):
    import comfy.model_management as mm

    mp = load_zimage(path)
    with torch.inference_mode():
        mm.load_models_gpu([mp], force_full_load=True)
    return mp


def _batch(seed: int = 0, b: int = 2, length: int = 7):
    """(x_t, sigma, text, target): 64 px (8×8 latents, 16 image tokens), captions of 64-wide states."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, 16, 8, 8, generator=g), torch.randn(b, 16, 8, 8, generator=g)
    sigma = torch.rand(b, generator=g) * 0.8 + 0.1
    return interpolate(x0, noise, sigma), sigma, TextBatch(torch.randn(b, length, 64, generator=g)), \
        velocity_target(x0, noise)


def _randomize(net: LoraNetwork, seed: int = 1, scale: float = 0.05) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_tiny_zimage_is_comfyui_zimage(comfyui, bridge, zimage_file):
    import comfy.model_base

    mp = load_zimage(zimage_file)
    assert type(mp.model) is comfy.model_base.Lumina2 and type(mp.model.model_config).__name__ == "ZImage"
    assert mp.model.diffusion_model.time_scale == 1000.0 and mp.model.diffusion_model.pad_tokens_multiple == 32
    assert set(mp.model.diffusion_model.state_dict()) == set(zimage_state_dict())  # every key, nothing left over
    assert bridge.detect_arch(mp) == bridge.ArchInfo("zimage", False, 16, 2, "ZImage")


def test_detect_arch_refuses_lumina2(comfyui, bridge):
    with pytest.raises(ValueError, match=r"FlowTrain trains FLUX.1, FLUX.2, .*Z-Image.* models; the MODEL input is a Lumina2"):
        bridge.detect_arch(harness.stub_model("Lumina2"))


def test_velocity_is_what_comfyui_denoises_with(comfyui, zimage_file):
    """ComfyUI's denoiser gives x0 = x_t - σ·v with v the module's output (CONST); on the
    exact ε - x0 target the adapter's velocity must rebuild x0: this fails for a flipped
    sign or a 1 - σ timestep on our side."""
    mp = _loaded(comfyui, zimage_file)
    model = NextDiTZImage(mp.model.diffusion_model)
    x_t, sigma, text, _ = _batch()
    with torch.inference_mode():
        v = model.velocity(x_t, sigma, text)
        denoised = mp.model.apply_model(x_t, sigma, c_crossattn=text.context, num_tokens=text.context.shape[1])
    assert v.dtype == torch.float32 and v.shape == x_t.shape
    assert (denoised - (x_t - sigma.view(-1, 1, 1, 1) * v)).abs().max() <= 1e-5


def test_zero_padded_captions_are_cut_to_their_length(comfyui, zimage_file):
    """Captions of different lengths in one batch (zero rows on the right) give what each
    caption gives alone, as ComfyUI samples them (NextDiT ignores masks)."""
    mp = _loaded(comfyui, zimage_file)
    model = NextDiTZImage(mp.model.diffusion_model)
    x_t, sigma, text, _ = _batch(seed=3)
    short = text.context[1, :4]
    padded = TextBatch(torch.stack([text.context[0], F.pad(short, (0, 0, 0, 3))]))
    with torch.inference_mode():
        both = model.velocity(x_t, sigma, padded)
        alone = model.velocity(x_t[1:], sigma[1:], TextBatch(short[None]))
        with_zeros = mp.model.diffusion_model(x_t[1:], sigma[1:], padded.context[1:], 7)
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert (with_zeros[0] - alone[0]).abs().max() > 1e-3  # the zero rows would have mattered


def test_zimage_trains_through_the_bridge(comfyui, bridge, zimage_file):
    import comfy.model_management as mm

    mp = load_zimage(zimage_file)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        assert isinstance(model, NextDiTZImage) and mm.in_training and model.checkpoint == "blocks"
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=4.0), model.default_targets["all"])
        assert sorted(net.modules_trained()) == [f"layers.0.{n}" for n in (
            "attention.out", "attention.qkv", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        batch, losses = _batch(), []
        for _ in range(8):
            loss = F.mse_loss(model.velocity(*batch[:3]), batch[3])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        net.remove()
    assert not mm.in_training
    assert losses[-1] < 0.9 * losses[0], losses


def test_checkpoint_modes_give_equal_gradients(comfyui, bridge, zimage_file):
    mp = load_zimage(zimage_file)
    with bridge.training_model(mp, harness.bridge_config("off")) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4), model.default_targets["all"])
        _randomize(net)
        grads = {}
        for mode in ("off", "blocks", "selective"):
            model.checkpoint = mode
            x_t, sigma, text, target = _batch()
            F.mse_loss(model.velocity(x_t, sigma, text), target).backward()
            grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
            for p in net.parameters():
                p.grad = None
        net.remove()
    assert all("forward" not in vars(blk) for blk in model.blocks())  # the wrappers are gone
    assert grads["off"].abs().max() > 0
    for mode in ("blocks", "selective"):
        assert (grads[mode] - grads["off"]).abs().max() <= 1e-5, mode


def test_saved_lora_loads_in_comfy_and_matches_live_model(comfyui, bridge, zimage_file):
    import comfy.model_management as mm

    mp = load_zimage(zimage_file)
    x_t, sigma, text, _ = _batch(seed=5)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=4, alpha=2.0), model.default_targets["all"])
        _randomize(net)
        with torch.no_grad():
            live = model.velocity(x_t, sigma, text)
        tensors = LORA_FORMATS.get(model.lora_format).to_tensors(net, model)
        trained = len(net.modules_trained())
        net.remove()
    assert model.lora_format == "zimage_diffusion_model"
    assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in tensors
    with_lora = bridge.model_with_lora(mp, tensors)  # raises on any key ComfyUI did not load
    assert len(with_lora.patches) == trained
    with torch.inference_mode():
        mm.load_models_gpu([with_lora], force_full_load=True)
        from_file = NextDiTZImage(with_lora.model.diffusion_model).velocity(x_t, sigma, text)
        mm.load_models_gpu([mp], force_full_load=True)
        base = NextDiTZImage(mp.model.diffusion_model).velocity(x_t, sigma, text)
    assert (from_file - live).abs().max() <= 1e-3 * live.abs().max()
    assert (live - base).abs().max() > 1e-2 * base.abs().max()  # the LoRA matters
