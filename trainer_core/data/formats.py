"""Which image files a dataset uses, decided from what the installed Pillow can decode.

Still-image formats photographers and artists use: PNG, JPEG, WebP, BMP, TIFF, and AVIF
and HEIF/HEIC when this Pillow reads them (AVIF needs Pillow >= 11.2 built with libavif;
HEIF needs the optional ``pillow-heif`` package, registered here when it is installed).
Nothing fails when a plugin is absent: those files are listed as ignored, with what to
install. Every other file (GIF, PSD, unknown extensions, ...) is ignored with a reason.
Animations (APNG, animated WebP/AVIF) are skipped when their header is read
(``images.image_size``); multi-page TIFF and multi-picture JPEG (MPO, from cameras) use
their first, main image.
"""
from __future__ import annotations

import functools
import logging

from PIL import Image, features

log = logging.getLogger(__name__)

# extension -> Pillow format name, in the order shown in messages
STILL_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".webp": "WEBP",
    ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".heic": "HEIF", ".heif": "HEIF",
    ".hif": "HEIF",
}
_PLUGIN_HINT = {
    "AVIF": "this Pillow has no AVIF support (install Pillow >= 11.2 built with libavif)",
    "HEIF": "this Pillow cannot read HEIF/HEIC (pip install pillow-heif)",
    "WEBP": "this Pillow has no WebP support",
}
# formats whose multi-frame files are animations (skipped); other multi-frame formats use frame 0
ANIMATED_FORMATS = frozenset({"PNG", "WEBP", "AVIF", "GIF"})


def _register_heif() -> None:
    try:
        import pillow_heif  # optional
    except ImportError:
        log.debug("pillow-heif is not installed: HEIF/HEIC images are not read")
        return
    pillow_heif.register_heif_opener()


@functools.lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """The extensions (lower case, with the dot) of every still format this Pillow decodes."""
    _register_heif()
    Image.init()
    registered = Image.registered_extensions()
    out = []
    for ext, fmt in STILL_FORMATS.items():
        if registered.get(ext) != fmt or fmt not in Image.OPEN:
            continue
        if fmt in ("AVIF", "WEBP") and not features.check(fmt.lower()):
            continue
        out.append(ext)
    return tuple(out)


def why_ignored(ext: str) -> str:
    """The reason a file with extension ``ext`` (not in ``image_extensions()``) is not used."""
    ext = ext.lower()
    fmt = STILL_FORMATS.get(ext)
    if fmt is not None:
        return _PLUGIN_HINT.get(fmt, f"this Pillow cannot read {fmt}")
    Image.init()
    known = Image.registered_extensions().get(ext)
    if known is not None:
        return f"{known} files are not used for training; export it as PNG or JPEG to use it"
    return "not an image type FlowTrain reads" if ext else "no file extension"
