"""A generated, captioned demo dataset with one learnable concept.

Every image shows the concept "sks": a red disc with a yellow ring and a dark centre, large
(radius 0.28-0.36 of the short side) and near the centre (jittered by up to ±6 % of each
side), on a varied plain or vertical-gradient background. The object is big and placed
consistently on purpose: the demo's base model has random weights, and in its ~1 minute of
CPU training a LoRA can learn one consistent object, not arbitrary placement. Captions are
comma-separated tags with the trigger first, e.g.
``"sks, a red ring object on a blue gradient background"``. Images go into the kohya-style
folder ``2_sks`` (2 repeats); by default every fourth image is non-square (landscape or
portrait 4:3) so buckets get exercised.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

TRIGGER = "sks"
REPEAT_FOLDER = f"2_{TRIGGER}"

# (name, RGB) — no red or yellow, so the object always stands out
BACKGROUNDS = (
    ("blue", (40, 70, 190)),
    ("green", (40, 150, 70)),
    ("grey", (128, 128, 128)),
    ("purple", (110, 50, 150)),
    ("teal", (30, 140, 140)),
    ("white", (235, 235, 235)),
)
RED, YELLOW, DARK = (210, 30, 30), (245, 210, 40), (30, 20, 20)
RADIUS = (0.28, 0.36)  # outer radius, as a fraction of the short side
JITTER = 0.06  # centre offset, as a fraction of each side


def _background(w: int, h: int, colour: tuple[int, int, int], gradient: bool) -> np.ndarray:
    base = np.array(colour, dtype=np.float32)
    if not gradient:
        return np.broadcast_to(base, (h, w, 3)).copy()
    # top lighter, bottom darker
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    top = base + (255 - base) * 0.35
    bottom = base * 0.55
    return np.broadcast_to((1 - t) * top + t * bottom, (h, w, 3)).copy()


def _draw_object(img: Image.Image, cx: float, cy: float, r: float) -> None:
    """Yellow outer ring, red disc, dark centre: radii r, 0.78 r, 0.3 r."""
    draw = ImageDraw.Draw(img)
    for radius, colour in ((r, YELLOW), (0.78 * r, RED), (0.3 * r, DARK)):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)


def _image_size(i: int, size: int) -> tuple[int, int]:
    """(width, height): every 4th image is 4:3 landscape or portrait, sides multiples of 16."""
    short = max(16, (size * 3 // 4) // 16 * 16)
    if i % 4 == 3:
        return (size, short) if (i // 4) % 2 == 0 else (short, size)
    return size, size


def write_demo_dataset(folder: Path, size: int = 128, count: int = 12, seed: int = 0,
                       mixed_sizes: bool = True) -> list[Path]:
    """Write ``count`` PNG + .txt pairs into ``folder / "2_sks"``; return the image paths.

    ``mixed_sizes=False`` makes every image square (``size``×``size``) instead of every
    fourth one 4:3. Deterministic in ``seed``. Overwrites files of the same names.
    """
    if count < 1 or size < 32:
        raise ValueError(f"write_demo_dataset needs count >= 1 and size >= 32, got {count}, {size}")
    out = Path(folder) / REPEAT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = _image_size(i, size) if mixed_sizes else (size, size)
        name, colour = BACKGROUNDS[i % len(BACKGROUNDS)]
        gradient = bool(rng.random() < 0.5)
        img = Image.fromarray(_background(w, h, colour, gradient).astype(np.uint8), "RGB")
        r = float(rng.uniform(*RADIUS)) * min(w, h)
        cx = w / 2 + float(rng.uniform(-JITTER, JITTER)) * w
        cy = h / 2 + float(rng.uniform(-JITTER, JITTER)) * h
        _draw_object(img, cx, cy, r)
        path = out / f"demo_{i:03d}.png"
        img.save(path)
        kind = f"{name} gradient" if gradient else name
        path.with_suffix(".txt").write_text(f"{TRIGGER}, a red ring object on a {kind} background\n")
        paths.append(path)
    log.info("wrote %d demo images to %s", count, out)
    return paths


def sample_prompts() -> tuple[list[str], list[str]]:
    """Preview prompts (with the trigger, without it) on the same backgrounds."""
    backgrounds = ("blue", "green", "white gradient")
    without = [f"a red ring object on a {b} background" for b in backgrounds]
    return [f"{TRIGGER}, {p}" for p in without], without


CONCEPT_DISTANCE = 60.0  # RGB distance (0-255 scale) that still counts as the object's red or yellow


def concept_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of pixels within ``CONCEPT_DISTANCE`` (Euclidean, 0-255 RGB)
    of the object's red or yellow: ``[N, 3, H, W]`` in [-1, 1] → ``[N]``.

    No background colour is that close to either (the nearest, purple, is ~157 away), so a
    training image scores its object's red + yellow area (~0.2-0.3 here) and colour noise
    only its chance hits (~0.03).
    """
    rgb = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)
    near = torch.zeros(rgb.shape[:3], dtype=torch.bool)
    for colour in (RED, YELLOW):
        near |= (rgb - torch.tensor(colour, dtype=torch.float32)).norm(dim=-1) < CONCEPT_DISTANCE
    return near.float().mean(dim=(1, 2))
