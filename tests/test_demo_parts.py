"""The embedded demo: DCT codec, hash text encoder, tiny FLUX.1, generated dataset, grids."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.demo.codec import DctCodec, codec_kernel
from trainer_core.demo.dataset import REPEAT_FOLDER, TRIGGER, sample_prompts, write_demo_dataset
from trainer_core.demo.grid import sample_images, save_grid
from trainer_core.demo.text import HashTextEncoder
from trainer_core.demo.tiny import parameter_count, tiny_flux1
from trainer_core.models.diffusers_flux import DiffusersFlux1
from trainer_core.types import LatentCodec, TextEncoder


def _smooth_image(h=64, w=96) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    r = 0.8 * torch.sin(2 * math.pi * x) * torch.cos(math.pi * y)
    g = 0.9 * (x - y)
    b = 0.6 * torch.cos(3 * math.pi * x * y)
    return torch.stack([r, g, b])[None]


def _load(path) -> torch.Tensor:
    arr = np.array(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


# ------------------------------------------------------------------ codec
def test_codec_kernel_is_orthonormal():
    k = codec_kernel().flatten(1)
    assert k.shape == (16, 192)
    torch.testing.assert_close(k @ k.T, torch.eye(16, dtype=torch.float64))


def test_codec_reconstructs_a_smooth_image():
    codec = DctCodec()
    assert isinstance(codec, LatentCodec) and codec.identity == "dct16-v1" and codec.downscale == 8
    x = _smooth_image()
    z = codec.encode(x)
    assert z.shape == (1, 16, 8, 12)
    y = codec.decode(z)
    psnr = 10 * math.log10(4 / (y - x).pow(2).mean().item())  # peak-to-peak 2
    assert psnr > 20, psnr


def test_codec_is_linear_and_idempotent_on_its_range():
    codec = DctCodec()
    a, b = _smooth_image(), torch.rand(1, 3, 64, 96) * 2 - 1
    torch.testing.assert_close(codec.encode(0.3 * a - 0.5 * b), 0.3 * codec.encode(a) - 0.5 * codec.encode(b))
    y = codec.decode(codec.encode(0.5 * a))  # half amplitude: nothing clamped
    assert y.abs().max() < 1
    torch.testing.assert_close(codec.decode(codec.encode(y)), y, rtol=0, atol=1e-5)
    z = codec.encode(0.5 * a)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, rtol=0, atol=1e-4)


def test_codec_latents_of_demo_images_are_roughly_unit_scale(tmp_path):
    codec = DctCodec()
    z = torch.cat([codec.encode(_load(p)).flatten(2) for p in write_demo_dataset(tmp_path, count=6)], 2)
    rms = z.pow(2).mean((0, 2)).sqrt()
    assert (rms > 0.4).all() and (rms < 2.5).all(), rms


def test_codec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        DctCodec().encode(torch.zeros(1, 3, 12, 16))


# ------------------------------------------------------------------ text
def test_hash_encoder_is_deterministic_and_normalises_words():
    a, b = HashTextEncoder(), HashTextEncoder()
    assert isinstance(a, TextEncoder) and a.identity == "hash-text-v1-64"
    e1 = a.encode(["A photo, of SKS!"])[0]
    e2 = b.encode(["a photo of sks"])[0]
    assert e1.context.shape == (4, 64) and e1.pooled.shape == (16,)
    assert torch.equal(e1.context, e2.context) and torch.equal(e1.pooled, e2.pooled)


def test_trigger_word_adds_exactly_one_token():
    enc = HashTextEncoder()
    with_trigger, without = enc.encode(["a photo of sks", "a photo of"])
    assert with_trigger.context.shape[0] == without.context.shape[0] + 1
    assert torch.equal(with_trigger.context[:3], without.context)
    assert not torch.allclose(with_trigger.pooled, without.pooled)
    other = enc.encode(["a photo of dog"])[0]
    assert not torch.allclose(other.context[3], with_trigger.context[3])


def test_empty_caption_and_token_cap():
    enc = HashTextEncoder(max_tokens=5)
    empty = enc.encode([""])[0]
    assert empty.context.shape == (1, 64) and not empty.context.any() and not empty.pooled.any()
    assert enc.encode(["one two three four five six seven"])[0].context.shape == (5, 64)
    assert enc.identity != HashTextEncoder().identity


# ------------------------------------------------------------------ tiny model
def test_tiny_flux1_size_and_seeding():
    state = torch.random.get_rng_state()
    a, b, c = tiny_flux1(seed=0), tiny_flux1(seed=0), tiny_flux1(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    n = parameter_count(a)
    assert 1_000_000 < n < 20_000_000, n
    assert torch.equal(a.x_embedder.weight, b.x_embedder.weight)
    assert not torch.equal(a.x_embedder.weight, c.x_embedder.weight)
    assert parameter_count(tiny_flux1(guidance=False)) < n  # no guidance embedder


# ------------------------------------------------------------------ dataset
def test_demo_dataset_files_and_captions(tmp_path):
    paths = write_demo_dataset(tmp_path, size=64, count=8, seed=3)
    assert len(paths) == 8 and all(p.parent == tmp_path / REPEAT_FOLDER for p in paths)
    assert REPEAT_FOLDER == "2_sks"
    sizes = set()
    for p in paths:
        with Image.open(p) as img:
            assert img.mode == "RGB" and img.width % 16 == 0 and img.height % 16 == 0
            sizes.add(img.size)
        caption = p.with_suffix(".txt").read_text().strip()
        assert caption.startswith(f"{TRIGGER}, ") and "red ring object" in caption
    assert (64, 64) in sizes and any(w != h for w, h in sizes)
    again = write_demo_dataset(tmp_path / "again", size=64, count=8, seed=3)
    assert all(np.array_equal(np.array(Image.open(p)), np.array(Image.open(q))) for p, q in zip(paths, again))


def test_demo_images_show_the_concept(tmp_path):
    for p in write_demo_dataset(tmp_path, count=4):
        rgb = np.array(Image.open(p)).reshape(-1, 3).astype(int)
        red = ((rgb[:, 0] > 180) & (rgb[:, 1] < 60) & (rgb[:, 2] < 60)).mean()
        yellow = ((rgb[:, 0] > 220) & (rgb[:, 1] > 180) & (rgb[:, 2] < 80)).mean()
        assert red > 0.02 and yellow > 0.01, p


def test_sample_prompts_split_on_the_trigger():
    with_trigger, without = sample_prompts()
    assert len(with_trigger) == len(without) > 0
    assert all(p.startswith(TRIGGER) for p in with_trigger)
    assert not any(TRIGGER in p.split(", ") for p in without)


# ------------------------------------------------------------------ sampling and grids
def test_sample_images_shape_range_and_seed():
    model = DiffusersFlux1(tiny_flux1())
    codec, text = DctCodec(), HashTextEncoder()
    prompts = ["sks, a red ring object", "a blue background"]
    a = sample_images(model, codec, text, prompts, seed=5, steps=2, size=(32, 48))
    assert a.shape == (2, 3, 32, 48) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0
    b = sample_images(model, codec, text, prompts, seed=5, steps=2, size=(32, 48))
    assert torch.equal(a, b)
    c = sample_images(model, codec, text, prompts, seed=6, steps=2, size=(32, 48))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="multiple of 16"):
        sample_images(model, codec, text, prompts, seed=5, steps=2, size=(40, 48))


def test_save_grid_writes_a_labelled_png(tmp_path):
    before = torch.full((3, 3, 16, 24), -1.0)
    after = torch.ones(2, 3, 16, 24)
    path = save_grid([before, after], tmp_path / "grid" / "samples.png", labels=["before", "after"])
    with Image.open(path) as img:
        grid = np.array(img.convert("RGB"))
    # 2 rows of 16 px and 3 columns of 24 px, 2 px gaps, plus the label column
    assert grid.shape[0] == 2 * 18 + 2 and grid.shape[1] > 3 * 26
    assert (grid[2:18, -26:-2] == 0).all()  # last "before" cell is black
    label_column = grid[:, :60]
    assert (label_column < 128).any()  # label text was drawn
    with pytest.raises(ValueError, match="labels"):
        save_grid([before], tmp_path / "x.png", labels=["a", "b"])
