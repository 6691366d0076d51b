"""The Z-Image adapter's pure parts (no ComfyUI): caption lengths and what it refuses.
Training, the sign convention and the file format run against ComfyUI's NextDiT in
tests/comfyui/test_zimage.py."""
import pytest
import torch
from torch import nn

from trainer_core.models.families import family
from trainer_core.models.zimage import NextDiTZImage, caption_lengths


def test_caption_lengths_cut_trailing_zero_rows_only():
    ctx = torch.randn(3, 6, 4)
    ctx[0, 4:] = 0  # padded to 6 from 4
    ctx[1, 2] = 0  # a zero row inside the caption is kept
    ctx[2] = 0  # all zero (a zeroed negative): one token
    assert caption_lengths(ctx) == [4, 6, 1]


class _NotNextDiT(nn.Module):
    def __init__(self, **missing):
        super().__init__()
        self.x_embedder = nn.Linear(64, 256)
        self.cap_embedder = nn.Sequential(nn.Identity(), nn.Linear(32, 256))
        self.context_refiner = nn.ModuleList()
        self.noise_refiner = nn.ModuleList()
        self.layers = nn.ModuleList()
        self.patch_size, self.in_channels = 2, 16
        for name in missing:
            setattr(self, name, None)


def test_adapter_reads_the_record_and_checks_the_bridge_values():
    model = NextDiTZImage(_NotNextDiT())
    fam = family("zimage")
    assert model.arch == "zimage" and model.lora_format == fam.lora_format == "zimage_diffusion_model"
    assert model.pixel_multiple == 16 and model.default_targets == dict(fam.target_presets)
    assert model.model_shape().hidden == 256 and model.model_shape().context == 32
    with pytest.raises(ValueError, match="latent_channels=128, but this NextDiT module has 16"):
        NextDiTZImage(_NotNextDiT(), latent_channels=128)
    with pytest.raises(ValueError, match="guidance_embed=True"):
        NextDiTZImage(_NotNextDiT(), guidance_embed=True)
    with pytest.raises(ValueError, match="that family runs through"):
        NextDiTZImage(_NotNextDiT(), arch="flux1")
    with pytest.raises(ValueError, match="needs ComfyUI's NextDiT module \\(with 'layers'\\)"):
        NextDiTZImage(_NotNextDiT(layers=True))
