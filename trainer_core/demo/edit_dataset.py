"""A generated paired (edit) dataset with one learnable edit: swap the red and blue channels.

Each sample is a reference image (a plain or gradient background with two or three
discs of random colours at random places) in ``control/`` and its target beside it: the
same picture with the red and blue channels swapped, captioned with the edit
instruction. A model that sees the reference (``data.control_images``) can predict the
target exactly from it, so an edit LoRA has something systematic to learn; without the
reference the target is unpredictable. Folder: ``<folder>/1_edit/`` (kohya repeat folder)
with ``control/`` inside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

INSTRUCTION = "swap the red and blue colours"
FOLDER = "1_edit"


def edit_pair(size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """(reference, target) of ``size``×``size`` pixels."""
    base = rng.integers(30, 225, 3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None] * rng.uniform(0, 0.5)
    pixels = np.broadcast_to(base * (1 - t), (size, size, 3)).astype(np.uint8)
    ref = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(ref)
    for _ in range(int(rng.integers(2, 4))):
        r = size * rng.uniform(0.12, 0.25)
        cx, cy = rng.uniform(r, size - r, 2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    target = Image.fromarray(np.ascontiguousarray(np.asarray(ref)[..., ::-1]))
    return ref, target


def write_edit_dataset(folder: Path | str, *, size: int = 64, count: int = 6, seed: int = 0) -> Path:
    """Write ``count`` pairs (PNG) with captions; returns ``folder``."""
    folder = Path(folder)
    images = folder / FOLDER
    (images / "control").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        ref, target = edit_pair(size, rng)
        ref.save(images / "control" / f"pair_{i:03d}.png")
        target.save(images / f"pair_{i:03d}.png")
        (images / f"pair_{i:03d}.txt").write_text(INSTRUCTION, encoding="utf-8")
    return folder
