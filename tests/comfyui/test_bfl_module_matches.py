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
