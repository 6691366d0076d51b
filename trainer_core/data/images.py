"""Reading training images: any common PIL mode in, upright 8-bit RGB out.

``image_size`` reads only the header (cheap, used to choose buckets before anything is
decoded); ``load_image`` decodes, applying the EXIF orientation and converting the
mode; ``image_to_tensor`` maps RGB bytes to [-1, 1]. Large JPEGs are decoded at a
reduced DCT scale (``Image.draft``) when the caller says how small the result may be,
and every resize happens in PIL, so a 10000 px photo never becomes a giant tensor.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .formats import ANIMATED_FORMATS

log = logging.getLogger(__name__)

# EXIF orientations 5..8 rotate by 90 degrees: width and height swap.
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# what Pillow's decoders raise for damaged files (truncated data, broken chunks, bad tables)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageError(ValueError):
    """An image file cannot be used; the message names the file and what to do.
    ``reason``: the short reason alone (for lists of skipped files)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class AnimationError(ImageError):
    """An animation (APNG, animated WebP/AVIF): not a still image, so it is left out."""


def _fail(path: Path, reason: str) -> ImageError:
    return ImageError(
        f"cannot read image {path}: {reason}. Re-export it (e.g. save it again as PNG or JPEG) "
        f"or delete it from the dataset folder.", reason
    )


def _open(path: Path) -> Image.Image:
    try:
        if path.stat().st_size == 0:
            raise _fail(path, "the file is empty (0 bytes)")
        return Image.open(path)
    except UnidentifiedImageError:
        raise _fail(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise _fail(path, f"too large for PIL's safety limit ({e}); downscale it first") from None
    except OSError as e:
        raise _fail(path, str(e)) from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):  # malformed EXIF: treat as upright
        return 1


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied), from the header.
    Raises ``AnimationError`` for an animation (see ``formats``), ``ImageError`` when unreadable."""
    path = Path(path)
    with _open(path) as img:
        try:
            animated = img.format in ANIMATED_FORMATS and getattr(img, "is_animated", False)
            frames = getattr(img, "n_frames", 2) if animated else 1
        except _DECODE_ERRORS as e:  # a broken chunk list
            raise _fail(path, str(e) or type(e).__name__) from None
        if animated:
            reason = f"an animation ({frames} frames), not a still image; export the frame you want as PNG or JPEG"
            raise AnimationError(f"{path} is {reason}", reason)
        w, h = img.size
        if _orientation(img) in _SWAPS_SIDES:
            w, h = h, w
    if w < 1 or h < 1:
        raise _fail(path, f"it has an empty size {w}x{h}")
    return w, h


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (I;16*) or 32-bit integer (I, how PIL often opens 16-bit PNGs) greyscale.

    PIL's own ``convert("RGB")`` clips these at 255 (almost all white); we rescale the
    0..65535 range to 0..255 instead (v8 = round(v16 / 257)).
    """
    arr = np.asarray(img.convert("I") if img.mode != "I" else img, dtype=np.float64)
    grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited on white (a transparent
    background must not turn black); 16-bit greyscale is rescaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def load_image(path: Path | str, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` into an upright RGB image.

    ``min_size``: (width, height) of the upright image the caller will resize to at most;
    JPEGs are then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that stays at least
    that large, which is exact enough for a later downscale and 4-64x cheaper.
    Raises ``ImageError`` (naming the file) for empty, truncated or non-image files.
    """
    path = Path(path)
    src = _open(path)
    try:
        if min_size is not None and src.format == "JPEG":
            want = min_size[::-1] if _orientation(src) in _SWAPS_SIDES else min_size
            src.draft(None, (max(1, int(want[0])), max(1, int(want[1]))))
        src.load()
        upright = ImageOps.exif_transpose(src)
        rgb = to_rgb(upright)
        return rgb if rgb is not src else rgb.copy()
    except Image.DecompressionBombError as e:
        raise _fail(path, f"too large for PIL's safety limit ({e}); downscale it first") from None
    except _DECODE_ERRORS as e:  # truncated data, broken chunks, decoder errors
        raise _fail(path, str(e) or type(e).__name__) from None
    finally:
        src.close()


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 [3, H, W] in [-1, 1] (x = v / 127.5 - 1)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
