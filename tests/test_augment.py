"""Augmentation (flip, random crop, colour jitter) and caption extras (wildcards, tag
dropout, caption-dropout ramp), as pure functions and through the real dataset."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.config import AugmentConfig, BucketConfig, CaptionConfig, DataConfig
from trainer_core.data.augment import color_jitter, flip_allowed, random_crop_box
from trainer_core.data.buckets import cover_crop_box
from trainer_core.data.captions import CaptionPolicy, dropout_probability, drop_tags, expand_wildcards
from trainer_core.data.dataset import _pixels, prepare_dataset
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ pure parts
def test_flip_opt_out_is_whole_word_and_case_insensitive():
    words = ("left", "right", "text")
    assert not flip_allowed("sks, Left hand raised", words)
    assert not flip_allowed("a sign with text", words)
    assert flip_allowed("sks, leftover cake, righteous, texture", words)
    assert flip_allowed("anything", ())


def test_color_jitter_matches_the_formula():
    x = torch.rand(3, 4, 5, generator=_g(1)) * 2 - 1
    s = (0.3, 0.2, 0.5)
    got = color_jitter(x, _g(2), brightness=s[0], contrast=s[1], saturation=s[2])
    u = torch.rand(3, generator=_g(2), dtype=torch.float64)
    fb, fc, fs = (1 + (2 * float(u[i]) - 1) * s[i] for i in range(3))
    luma = lambda t: 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]  # noqa: E731
    v = ((x + 1) / 2 * fb).clamp(0, 1)
    v = (luma(v).mean() + fc * (v - luma(v).mean())).clamp(0, 1)
    v = (luma(v) + fs * (v - luma(v))).clamp(0, 1)
    torch.testing.assert_close(got, v * 2 - 1)
    assert not torch.allclose(got, x)
    torch.testing.assert_close(color_jitter(x, _g(3), brightness=0, contrast=0, saturation=0), x)


def test_random_crop_stays_inside_and_uses_the_overhang():
    size, bucket = (100, 64), (64, 64)
    scaled, centre = cover_crop_box(size, bucket)
    boxes = {random_crop_box(size, bucket, _g(i))[1] for i in range(40)}
    assert len(boxes) > 10  # 37 × 1 positions
    assert centre[1] == 0 and all(box[1] == 0 for box in boxes)  # no vertical overhang
    for left, top, right, bottom in boxes:
        assert 0 <= left and right <= scaled[0] and 0 <= top and bottom <= scaled[1]
        assert (right - left, bottom - top) == bucket


def test_wildcards_and_tag_dropout():
    outs = {expand_wildcards("sks, {red|blue|green} ball, {a|b}", _g(i)) for i in range(60)}
    assert len(outs) == 6 and all("{" not in o for o in outs)
    assert expand_wildcards("no {braces} here", _g()) == "no {braces} here"
    caption = "sks, a, b, c, d, e, f, g, h"
    kept = [drop_tags(caption, _g(i), keep=1, separator=",", p=0.5) for i in range(200)]
    assert all(k.startswith("sks") for k in kept)
    mean_tags = np.mean([len(k.split(",")) - 1 for k in kept])
    assert mean_tags == pytest.approx(4.0, abs=0.4)  # 8 tags × (1 - 0.5)
    policy = CaptionPolicy(CaptionConfig(trigger_word="sks", tag_dropout=0.5, shuffle_variants=8))
    assert len(policy.variants(policy.base_caption("x, {y|z}, w, v"), _g())) == 8


def test_caption_dropout_ramp():
    assert dropout_probability(0.2, 0, 0) == 0.2
    assert dropout_probability(0.2, 100, 0) == 0.0
    assert dropout_probability(0.2, 100, 50) == pytest.approx(0.1)
    assert dropout_probability(0.2, 100, 1000) == pytest.approx(0.2)
    assert dropout_probability(0.2, 100, None) == 0.2


# ------------------------------------------------------------------ through the dataset
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, caption in [("a", "sks, a ball"), ("b", "sks, {red|blue} cube"), ("c", "sks, left hand")]:
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    return root


def _prepare(folder, tmp_path, augment=None, **captions):
    cfg = DataConfig(path=str(folder), batch_size=3, buckets=BucketConfig(resolutions=(64,), step=16, min_side=32),
                     captions=CaptionConfig(trigger_word="sks", **captions), augment=augment or AugmentConfig())
    return prepare_dataset(cfg, DctCodec(), HashTextEncoder(), cache_dir=tmp_path / "cache", pixel_multiple=16, seed=1)


def test_flip_caches_mirrored_latents_and_respects_opt_out(folder, tmp_path):
    ds = _prepare(folder, tmp_path, AugmentConfig(flip=True))
    assert not ds.needs_codec
    by_name = {e.source.stem: e for e in ds.entries}
    assert by_name["c"].flipped is None and not by_name["c"].flip_ok  # "left" opts out
    for name in ("a", "b"):
        e = by_name[name]
        pixels = _pixels(e.source, e.size, e.bucket)
        torch.testing.assert_close(e.latent, DctCodec().encode(pixels[None])[0])
        torch.testing.assert_close(e.flipped, DctCodec().encode(pixels.flip(-1)[None])[0])
    seen = {name: set() for name in by_name}
    for i in range(30):
        b = ds.batch(0, _g(i))
        for src, lat in zip(b.sources, b.latents):
            e = next(e for e in ds.entries if str(e.source) == src)
            seen[e.source.stem].add(bool(e.flipped is not None and torch.equal(lat, e.flipped)))
    assert seen["a"] == {True, False} and seen["c"] == {False}
    again = _prepare(folder, tmp_path / "x", AugmentConfig(flip=True))
    torch.testing.assert_close(ds.batch(2, _g(9)).latents, again.batch(2, _g(9)).latents)


def test_crop_and_jitter_encode_live_and_keep_the_codec(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = _prepare(folder, tmp_path, AugmentConfig(random_crop=True, color_jitter=True, brightness=0.5))
    assert ds.needs_codec and "cannot be cached" in caplog.text
    a, b, a2 = ds.batch(0, _g(1)), ds.batch(0, _g(2)), ds.batch(0, _g(1))
    torch.testing.assert_close(a.latents, a2.latents)  # same generator, same augmentation
    assert not torch.allclose(a.latents, b.latents)
    assert a.latents.shape == torch.stack([e.latent for e in ds.entries]).shape


def test_caption_dropout_ramps_with_the_step(folder, tmp_path):
    ds = _prepare(folder, tmp_path, caption_dropout=0.5, caption_dropout_warmup_steps=100)
    early = sum(c == "" for i in range(40) for c in ds.batch(i, _g(i), step=0).captions)
    late = sum(c == "" for i in range(40) for c in ds.batch(i, _g(i), step=200).captions)
    assert early == 0 and 30 < late < 90  # 120 captions × 0.5
    wild = {c for i in range(40) for c in ds.batch(i, _g(i), step=0).captions}
    assert any("red cube" in c for c in wild) and any("blue cube" in c for c in wild)
