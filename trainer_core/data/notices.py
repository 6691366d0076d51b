"""Messages about a dataset that name files: crops that discard most of an image, captions
longer than the text encoder reads, and where each encoded text comes from (for errors
about one text). Each warning lists every file at once (``scan.listing``)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..types import TextEncoder
from .buckets import crop_loss
from .scan import listing

log = logging.getLogger("trainer_core.data.dataset")  # the dataset's own log, as before

HEAVY_CROP = 0.5  # warn when cropping into the bucket discards more than this fraction of an image


def warn_heavy_crops(planned: list) -> list[str]:
    """One warning naming every image that some bucket crops by more than ``HEAVY_CROP``."""
    lost: dict[Path, list[str]] = {}
    for p in planned:
        if (loss := crop_loss(p.size, p.bucket)) > HEAVY_CROP:
            lost.setdefault(p.record.path, []).append(f"{loss:.0%} cropped away at {p.bucket[0]}x{p.bucket[1]}")
    sizes = {p.record.path: p.size for p in planned}
    heavy = [f"{path} ({sizes[path][0]}x{sizes[path][1]}): {', '.join(why)}" for path, why in lost.items()]
    if heavy:
        log.warning("%d image(s) lose more than half of their area when centre-cropped into their bucket (extreme "
                    "aspect ratio; crop them yourself, or lower buckets.min_side / raise buckets.max_side):%s",
                    len(heavy), listing(heavy))
    return heavy


def warn_overlong(text_encoder: TextEncoder, variants: dict[Path, tuple[str, ...]],
                   caption_files: dict[Path, Path | None]) -> list[str]:
    """One warning naming the caption file of every caption (any variant) longer than the
    text encoder reads (``TextEncoder.overlong``, when the encoder has it)."""
    check = getattr(text_encoder, "overlong", None)
    if check is None:
        return []
    cut = check(list(dict.fromkeys(t for vs in variants.values() for t in vs)))
    lines = []
    for image, texts in variants.items():
        why = next((cut[t] for t in texts if t in cut), None)
        if why is not None:
            lines.append(f"{caption_files.get(image) or f'{image} (no caption file)'}: {why}")
    if lines:
        log.warning("%d caption(s) are longer than the text encoder %s reads; their end is cut off (shorten "
                    "them):%s", len(lines), text_encoder.identity, listing(lines))
    return lines


def text_sources(records, variants: dict[Path, tuple[str, ...]], extras: dict[str, dict[str, str]],
                  extension: str) -> dict[str, str]:
    """text → where it comes from (its caption file), for messages about one text."""
    ext = extension if extension.startswith(".") else "." + extension
    out: dict[str, str] = {"": "the empty caption of caption dropout"}
    for r in records:
        where = f"caption file {r.caption_path or r.path.with_suffix(ext)}" if r.caption is not None else f"image {r.path}, no caption file"
        for text in variants.get(r.path, ()):
            out.setdefault(text, where)
    for name, table in extras.items():
        for main, text in table.items():
            out.setdefault(text, f"{name} of {out.get(main, 'a caption')}")
    return out
