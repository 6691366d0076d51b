"""The engine's own BFL FLUX module (``trainer_core.models.bfl_module``) computes what
ComfyUI's ``comfy.ldm.flux.model.Flux`` computes, on the same file, for FLUX.1 dev/schnell
and FLUX.2 with/without guidance: the command line trains the model ComfyUI samples."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.models.bfl_module import BflFluxModule, params_from_state_dict


@pytest.mark.parametrize("arch,guidance", [("flux1", True), ("flux1", False), ("flux2", True), ("flux2", False)])
def test_own_module_matches_comfyui(comfyui, tmp_path, arch, guidance):
    path = comfyui.write_tiny_flux(tmp_path / f"{arch}.safetensors", arch, guidance=guidance, hidden=256, depth=2,
                                   depth_single=2, std=0.05)
    theirs = comfyui.load_flux(path, inference=False).model.diffusion_model.float()
    sd = load_file(str(path))
    mine = BflFluxModule(params_from_state_dict({k: tuple(v.shape) for k, v in sd.items()}))
    mine.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16 if arch == "flux1" else 128, 8, 6, generator=g)
    context = torch.randn(2, 5, 64, generator=g)
    y = torch.randn(2, 32, generator=g) if arch == "flux1" else None
    kw = dict(y=y, guidance=torch.tensor([3.5, 1.0]) if guidance else None)
    with torch.no_grad():
        a = theirs(x, torch.tensor([0.3, 0.8]), context, transformer_options={}, **kw)
        b = mine(x, torch.tensor([0.3, 0.8]), context, **kw)
    assert a.abs().max() > 0.5  # a real signal, not zeros
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_vae_file_codec_matches_comfyui(comfyui, tmp_path, arch):
    """``single_file.load_vae`` gives the latents the node's VaeCodec gives (ComfyUI's VAE and
    latent format): FLUX.1 scaled and shifted, FLUX.2 packed 2×2 and batch-normed."""
    from trainer_core.models.single_file import load_vae

    path = comfyui.write_tiny_vae(tmp_path / f"{arch}_vae.safetensors", arch, dtype=torch.float32, std=0.05)
    g = torch.Generator().manual_seed(0)
    sd = load_file(str(path))
    if arch == "flux2":  # statistics that are not the identity, so normalising is checked
        sd["bn.running_mean"] = torch.randn(128, generator=g) * 0.1
        sd["bn.running_var"] = torch.rand(128, generator=g) + 0.5
        from safetensors.torch import save_file

        save_file(sd, str(path))
    theirs = comfyui.load_vae(path)
    import comfy.latent_formats

    fmt = comfy.latent_formats.Flux() if arch == "flux1" else comfy.latent_formats.Flux2()
    mine = load_vae(path, dtype=torch.float32, device=torch.device("cpu"), arch=arch)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.inference_mode():
        expected = fmt.process_in(theirs.encode(((pixels + 1) / 2).movedim(1, -1)).float())
    got = mine.encode(pixels)
    assert got.shape == expected.shape == ((1, 16, 8, 8) if arch == "flux1" else (1, 128, 4, 4))
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    with torch.inference_mode():
        decoded = theirs.decode(fmt.process_out(expected)).movedim(-1, 1) * 2 - 1
    assert (mine.decode(expected) - decoded.float()).abs().max() <= 1e-3 * decoded.abs().max()


@pytest.mark.parametrize("marker", ["layer", "header"])
def test_comfy_quant_fp8_file_loads_as_comfyui_dequantizes_it(comfyui, tmp_path, marker):
    """A ``comfy_quant`` fp8 file (marked per layer or in the header): the single-file loader's
    weights equal ComfyUI's dequantized ones exactly, and the model runs."""
    from trainer_core.models.single_file import load_diffusion_model

    path = comfyui.write_tiny_flux_quantized(tmp_path / f"fp8_{marker}.safetensors", "flux1", marker=marker)
    theirs = comfyui.load_flux(path, inference=False).model.diffusion_model
    mine = load_diffusion_model(path, dtype=torch.float32, device=torch.device("cpu")).module
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        w = theirs.get_submodule(name).weight
        assert type(w).__name__ == "QuantizedTensor"  # the file really is quantized
        assert torch.equal(mine.get_submodule(name).weight, w.dequantize().float())
