"""A generated, captioned demo dataset with one learnable concept.

Every image shows the concept "sks": a red disc with a yellow ring and a dark centre, at
a varied position and size on a varied plain or vertical-gradient background. Captions are
comma-separated tags with the trigger first, e.g.
``"sks, a red ring object on a blue gradient background"``. Images go into the kohya-style
folder ``2_sks`` (2 repeats); every fourth image is non-square (landscape or portrait
4:3) so buckets get exercised.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
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


def write_demo_dataset(folder: Path, size: int = 128, count: int = 12, seed: int = 0) -> list[Path]:
    """Write ``count`` PNG + .txt pairs into ``folder / "2_sks"``; return the image paths.

    Deterministic in ``seed``. Overwrites files of the same names.
    """
    if count < 1 or size < 32:
        raise ValueError(f"write_demo_dataset needs count >= 1 and size >= 32, got {count}, {size}")
    out = Path(folder) / REPEAT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = _image_size(i, size)
        name, colour = BACKGROUNDS[i % len(BACKGROUNDS)]
        gradient = bool(rng.random() < 0.5)
        img = Image.fromarray(_background(w, h, colour, gradient).astype(np.uint8), "RGB")
        r = float(rng.uniform(0.18, 0.32)) * min(w, h)
        cx = float(rng.uniform(r, w - r))
        cy = float(rng.uniform(r, h - r))
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
