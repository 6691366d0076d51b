"""The loss curve as a raster image (PIL), for hosts that show images, not SVG files.

``loss_curve_image(history)`` draws the raw loss (faint) and its moving average (bold)
against the step, like ``report.learning_curve_svg``; an empty history gives a blank
chart with a note. ``image_to_array`` turns it into float32 [H, W, 3] in [0, 1].
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .report import moving_average

_RAW, _AVG, _GRID, _AXIS = (157, 180, 214), (31, 78, 156), (235, 235, 235), (136, 136, 136)


def loss_curve_image(history: Sequence[dict], *, width: int = 512, height: int = 256, window: int = 20) -> Image.Image:
    """An RGB chart of ``history`` (``[{"step": int, "loss": float}, ...]``)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, 10, 20, 22
    pw, ph = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline=_AXIS)
    points = [(float(h["step"]), float(h["loss"])) for h in history if math.isfinite(float(h["loss"]))]
    if not points:
        draw.text((left + 8, top + 8), "no steps yet", fill=_AXIS)
        return img
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    avg = moving_average(losses, window)
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1e-9
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        draw.line([left, sy(y), left + pw, sy(y)], fill=_GRID)
        draw.text((2, sy(y) - 6), f"{y:.3g}", fill=_AXIS)
    draw.text((left, height - 16), f"step {int(x0)}", fill=_AXIS)
    draw.text((left + pw - 70, height - 16), f"step {int(max(steps))}", fill=_AXIS)
    draw.text((left + 4, 4), f"loss {losses[-1]:.4f}   avg {avg[-1]:.4f}", fill=_AVG)
    if len(points) == 1:
        x, y = sx(steps[0]), sy(losses[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_AVG)
        return img
    draw.line([(sx(x), sy(y)) for x, y in zip(steps, losses)], fill=_RAW, width=1)
    draw.line([(sx(x), sy(y)) for x, y in zip(steps, avg)], fill=_AVG, width=2)
    return img


def image_to_array(img: Image.Image) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
