"""Aspect-ratio bucketing: one (width, height) per image and resolution.

Rule (``choose_bucket``). With target area ``A = res²`` (or ``min(res², w·h)`` when
upscaling is off), among all sides ``(bw, bh)`` that are multiples of ``step``, lie in
``[min_side, max_side]``, have ``bw·bh <= A`` and, without upscaling, ``bw <= w`` and
``bh <= h``, pick the largest area whose *crop loss* is under one step. The crop loss is
how many bucket pixels the image overhangs after it is scaled to cover the bucket:
``(w·c - bw) + (h·c - bh)`` with ``c = max(bw/w, bh/h)`` (one term is 0). Ties go to the
smaller crop loss, then the wider bucket.

A bucket within one step always exists when the ideal size ``(w, h)·sqrt(A/(w·h))``
fits in the side limits: flooring both ideal sides to the step loses less than one step
in the cropped direction. So this is ai-toolkit's "area closest to min(w·h, res²),
never upscale" with kohya's "nearest aspect ratio" as the tie-breaking constraint,
on exact step-aligned sides. Images so elongated that ``min_side``/``max_side`` forbid
the ideal shape fall back to the bucket of nearest aspect ratio (largest area among
those), i.e. they get cropped more than one step. ``None`` means no bucket fits at all
(the image is smaller than ``min_side`` and upscaling is off): the caller skips it.
"""
from __future__ import annotations

import math

from PIL import Image


def _crop_loss(w: int, h: int, bw: int, bh: int) -> float:
    c = max(bw / w, bh / h)
    return (w * c - bw) + (h * c - bh)


def _candidates(w: int, h: int, area: float, step: int, lo: int, hi: int, upscale: bool):
    w_cap = hi if upscale else min(hi, (w // step) * step)
    for bw in range(lo, w_cap + 1, step):
        h_cap = min(hi, int(area // bw) // step * step)
        if not upscale:
            h_cap = min(h_cap, (h // step) * step)
        if h_cap < lo:
            continue
        ideal = bw * h / w  # height with the image's exact aspect ratio at this width
        below = int(ideal // step) * step
        # Taller than ideal, the crop loss is (bh - ideal)·w/h: the tallest bucket under
        # one step of loss is the last multiple of step below ideal + step·h/w.
        tallest = math.ceil((ideal + step * h / w) / step) * step - step
        for bh in {below, below + step, tallest, h_cap}:
            yield bw, min(max(bh, lo), h_cap)


def choose_bucket(
    width: int,
    height: int,
    resolution: int,
    step: int,
    min_side: int,
    max_side: int,
    allow_upscale: bool,
) -> tuple[int, int] | None:
    """(bucket_width, bucket_height) for a ``width``×``height`` image, or None.

    See the module docstring for the rule. Sides are multiples of ``step``; the area is
    at most ``resolution²``; without ``allow_upscale`` the bucket also fits inside the
    image (so the image is only ever scaled down).
    """
    if width < 1 or height < 1 or step < 1:
        raise ValueError(f"choose_bucket needs positive sizes, got {width}x{height}, step {step}")
    area = float(resolution) ** 2 if allow_upscale else min(float(resolution) ** 2, width * height)
    lo = math.ceil(min_side / step) * step
    hi = (max_side // step) * step
    best_key, best = None, None
    aspect = math.log(width / height)
    for bw, bh in _candidates(width, height, area, step, max(lo, step), hi, allow_upscale):
        loss = _crop_loss(width, height, bw, bh)
        within = loss < step
        # Within one step: biggest area wins. Otherwise: nearest aspect ratio, then area.
        off = 0.0 if within else abs(math.log(bw / bh) - aspect)
        key = (not within, off, -bw * bh, loss, -bw)
        if best_key is None or key < best_key:
            best_key, best = key, (bw, bh)
    return best


def resolutions_for(width: int, height: int, resolutions: tuple[int, ...], allow_upscale: bool) -> list[int]:
    """The resolutions an image trains at: every ``res`` with ``res² <= width·height``
    (it is large enough; all of them when upscaling is allowed). An image smaller than
    every resolution still trains once, at the smallest, at about its own size. This
    keeps a small image from appearing several times at the same native size."""
    ordered = sorted(set(resolutions))
    if allow_upscale:
        return ordered
    fitting = [r for r in ordered if r * r <= width * height]
    return fitting or ordered[:1]


def cover_crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Scaled size that covers ``bucket`` and the centred crop box inside it.

    Returns ``((sw, sh), (left, top, right, bottom))`` with the box in scaled-image
    pixels. Pure arithmetic: cache keys are computed from it before anything is decoded.
    """
    w, h = size
    bw, bh = bucket
    c = max(bw / w, bh / h)
    sw, sh = max(bw, round(w * c)), max(bh, round(h * c))
    left, top = (sw - bw) // 2, (sh - bh) // 2
    return (sw, sh), (left, top, left + bw, top + bh)


CROPS = ("center",)


def resize_and_crop(img: Image.Image, bucket: tuple[int, int], crop: str = "center") -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale ``img`` (Lanczos) so it covers ``bucket``, then crop it to the bucket.

    Returns the ``bucket``-sized image and the crop box in scaled-image pixels (as
    ``cover_crop_box``). ``reducing_gap`` makes big downscales cheap (PIL first reduces
    by an integer factor with a box filter), so huge photos stay fast.
    """
    if crop not in CROPS:
        raise ValueError(f"unknown crop mode {crop!r}; use one of: {', '.join(CROPS)}")
    scaled, box = cover_crop_box(img.size, bucket)
    if scaled != img.size:
        img = img.resize(scaled, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.crop(box), box


def crop_loss(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """Fraction of the image's area that the cover-and-centre-crop into ``bucket`` discards."""
    (sw, sh), _ = cover_crop_box(size, bucket)
    return 1.0 - bucket[0] * bucket[1] / (sw * sh)
