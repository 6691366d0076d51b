"""Image augmentation, every random choice drawn from the step generator.

* Horizontal flip (probability ½) is *cacheable*: the dataset encodes a second latent
  from the mirrored pixels (the cache key has a flip flag) and picks one per sample.
  Images whose caption names a side or contains text opt out: any of
  ``flip_opt_out_words`` as a whole word, case-insensitive.
* Random crop and colour jitter change the pixels every step, so they cannot be cached:
  the dataset keeps the codec and encodes each batch live (``CachedDataset.needs_codec``).

Pixels are [3, H, W] in [-1, 1] (``images.image_to_tensor``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from ..config import AugmentConfig
from .buckets import cover_crop_box
from .images import image_to_tensor, load_image

# ITU-R BT.601 luma weights (what torchvision's rgb_to_grayscale uses).
_LUMA = (0.299, 0.587, 0.114)


def flip_allowed(caption: str, opt_out_words: Iterable[str]) -> bool:
    """False when ``caption`` contains any opt-out word as a whole word (any case)."""
    for word in opt_out_words:
        if word and re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", caption, flags=re.IGNORECASE):
            return False
    return True


def needs_live_encoding(cfg: AugmentConfig) -> bool:
    """Random crop and colour jitter change pixels every step: no latent cache for them."""
    return cfg.random_crop or cfg.color_jitter


def random_crop_box(size: tuple[int, int], bucket: tuple[int, int],
                    generator: torch.Generator) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Like ``buckets.cover_crop_box`` (scale to cover the bucket) but the crop's left and
    top are uniform over every position that stays inside the scaled image. Always draws
    two numbers. The freedom is the overhang, i.e. what the aspect-ratio mismatch leaves."""
    scaled, _ = cover_crop_box(size, bucket)
    (sw, sh), (bw, bh) = scaled, bucket
    left = int(torch.randint(sw - bw + 1, (1,), generator=generator))
    top = int(torch.randint(sh - bh + 1, (1,), generator=generator))
    return scaled, (left, top, left + bw, top + bh)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] → luma [1, H, W]."""
    w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def color_jitter(pixels: torch.Tensor, generator: torch.Generator, *, brightness: float, contrast: float,
                 saturation: float) -> torch.Tensor:
    """Random brightness, contrast and saturation, in that order, on [3, H, W] in [-1, 1].

    With u = (x+1)/2 in [0, 1] and factors f ~ U(1-s, 1+s) (three draws, always):
    brightness ``u·f_b``; contrast ``m + f_c·(u - m)`` with m the image's mean luma;
    saturation ``g + f_s·(u - g)`` with g the pixel's luma; clamped to [0, 1] after each
    (the definitions of torchvision's ``ColorJitter``, its order fixed).
    """
    f = 1 + (2 * torch.rand(3, generator=generator, dtype=torch.float64) - 1) * torch.tensor(
        [brightness, contrast, saturation], dtype=torch.float64)
    fb, fc, fs = (float(v) for v in f)
    u = (pixels.float() + 1) / 2
    u = (u * fb).clamp(0, 1)
    m = _grey(u).mean()
    u = (m + fc * (u - m)).clamp(0, 1)
    g = _grey(u)
    u = (g + fs * (u - g)).clamp(0, 1)
    return (u * 2 - 1).to(pixels.dtype)


class Augmenter:
    """Loads one training image with this step's random crop, jitter and flip."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def pixels(self, path: Path, size: tuple[int, int], bucket: tuple[int, int], flip: bool,
               generator: torch.Generator) -> torch.Tensor:
        """[3, bh, bw] in [-1, 1]. Draws (in order) 2 numbers for the crop when
        ``random_crop``, 3 for the jitter when ``color_jitter``."""
        if self.cfg.random_crop:
            scaled, box = random_crop_box(size, bucket, generator)
        else:
            scaled, box = cover_crop_box(size, bucket)
        img = load_image(path, min_size=scaled)
        if img.size != scaled:
            img = img.resize(scaled, Image.Resampling.LANCZOS, reducing_gap=3.0)
        x = image_to_tensor(img.crop(box))
        if self.cfg.color_jitter:
            x = color_jitter(x, generator, brightness=self.cfg.brightness, contrast=self.cfg.contrast,
                             saturation=self.cfg.saturation)
        return x.flip(-1) if flip else x
