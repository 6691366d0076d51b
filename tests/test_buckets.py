"""Bucket choice invariants, checked against a brute-force search, and resize/crop."""
from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from trainer_core.data.buckets import choose_bucket, cover_crop_box, resize_and_crop


def _overhang(w, h, bw, bh):
    c = max(bw / w, bh / h)
    return (w * c - bw) + (h * c - bh)


def _cases(n=300, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        w = rng.randint(60, 3000)
        h = rng.randint(60, 3000) if rng.random() < 0.7 else int(w * rng.choice([0.25, 0.5, 2 / 3, 1, 1.5, 3]))
        yield w, max(1, h), rng.choice([256, 512, 768, 1024]), rng.choice([16, 32, 64]), rng.random() < 0.3


def test_bucket_invariants():
    checked = 0
    for w, h, res, step, upscale in _cases():
        b = choose_bucket(w, h, res, step, 64, 2048, upscale)
        if b is None:
            assert not upscale and min(w, h) < 64
            continue
        bw, bh = b
        checked += 1
        assert bw % step == 0 and bh % step == 0, (w, h, b)
        assert 64 <= bw <= 2048 and 64 <= bh <= 2048
        assert bw * bh <= res * res
        if not upscale:
            assert bw <= w and bh <= h, f"upscaled {w}x{h} to {b}"
            assert bw * bh <= w * h
        # The ideal (area-preserving) shape fits the side limits → aspect kept within one step.
        area = res * res if upscale else min(res * res, w * h)
        k = math.sqrt(area / (w * h))
        if 64 + step <= w * k <= 2048 and 64 + step <= h * k <= 2048:
            assert _overhang(w, h, bw, bh) < step, (w, h, res, step, b)
    assert checked > 200


def test_bucket_is_largest_area_within_one_step_brute_force():
    for w, h, res, step, upscale in _cases(120, seed=1):
        b = choose_bucket(w, h, res, step, 64, 2048, upscale)
        area = res * res if upscale else min(res * res, w * h)
        valid = [
            (bw * bh, bw, bh)
            for bw in range(64, 2049, step)
            for bh in range(64, 2049, step)
            if bw * bh <= area and (upscale or (bw <= w and bh <= h)) and _overhang(w, h, bw, bh) < step
        ]
        if valid:
            assert b is not None and b[0] * b[1] == max(valid)[0], (w, h, res, step, b, max(valid))


def test_known_buckets():
    assert choose_bucket(1024, 1024, 512, 64, 256, 2048, False) == (512, 512)
    assert choose_bucket(1024, 1024, 1024, 64, 256, 2048, False) == (1024, 1024)
    assert choose_bucket(600, 600, 1024, 64, 256, 2048, False) == (576, 576)  # never upscale
    assert choose_bucket(600, 600, 1024, 64, 256, 2048, True) == (1024, 1024)
    bw, bh = choose_bucket(3000, 2000, 1024, 16, 256, 2048, False)
    assert abs(bw / bh - 1.5) < 0.03 and bw * bh <= 1024**2


def test_too_small_returns_none_unless_upscaling():
    assert choose_bucket(200, 1000, 512, 64, 256, 2048, False) is None
    assert choose_bucket(200, 1000, 512, 64, 256, 2048, True) is not None


def test_extreme_aspect_falls_back_to_nearest_aspect():
    bw, bh = choose_bucket(8000, 400, 1024, 64, 256, 2048, False)
    assert (bw, bh) == (2048, 256)  # as wide as max_side allows, as short as min_side allows


def test_cover_crop_box_is_centred_and_exact():
    scaled, box = cover_crop_box((300, 100), (128, 64))
    assert scaled == (192, 64) and box == (32, 0, 160, 64)


def test_resize_and_crop_keeps_the_centre():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (140, 0, 160, 100))  # red stripe in the middle
    out, box = resize_and_crop(img, (128, 64))
    assert out.size == (128, 64) and box == (32, 0, 160, 64)
    assert out.getpixel((64, 32))[0] > 200 and out.getpixel((5, 32))[2] > 200
    with pytest.raises(ValueError, match="center"):
        resize_and_crop(img, (64, 64), crop="diagonal")


def test_resolutions_for_uses_every_resolution_the_image_reaches():
    from trainer_core.data.buckets import resolutions_for

    assert resolutions_for(1100, 1000, (1024, 512, 768), False) == [512, 768, 1024]
    assert resolutions_for(800, 800, (512, 768, 1024), False) == [512, 768]
    assert resolutions_for(300, 300, (512, 1024), False) == [512]  # smaller than all: once, at its size
    assert resolutions_for(300, 300, (512, 1024), True) == [512, 1024]
