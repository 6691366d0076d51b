"""The reference images of an edit dataset: planned, encoded and batched with their target.

Sizing rule: a reference is scaled to cover its target's bucket and centre-cropped to it
(the same ``cover_crop_box`` as targets), so target and references of a sample share one
latent size and a batch stacks them. This is the default of musubi-tuner and ai-toolkit
(control resized to the target's size) and what ComfyUI's Kontext workflows do when the
reference is scaled with the target. Each reference latent is cached under its own
content hash, bucket, crop box, codec and flip (``LatentCache.key``), so an edited
reference gets a new key and a reference shared by several targets is encoded once per
bucket.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from .buckets import cover_crop_box, resize_and_crop
from .cache import LatentCache, LatentJob
from .images import image_to_tensor, load_image
from .scan import ImageRecord
from .survey import undecodable

RefPlan = tuple[Path, tuple[int, int], str, "str | None"]  # (file, upright size, key, flip key or None)


def reference_plan(record: ImageRecord, sizes: Mapping[Path, tuple[int, int]], bucket: tuple[int, int],
                   codec_identity: str, flip: bool) -> tuple[RefPlan, ...]:
    """Cache keys of ``record``'s references in ``bucket`` (and mirrored, with ``flip``)."""
    out = []
    for path, content in zip(record.references, record.reference_hashes):
        size = sizes[path]
        _, box = cover_crop_box(size, bucket)
        key = LatentCache.key(content, bucket, box, codec_identity, flip=False)
        flip_key = LatentCache.key(content, bucket, box, codec_identity, flip=True) if flip else None
        out.append((path, size, key, flip_key))
    return tuple(out)


def reference_pixels(path: Path, size: tuple[int, int], bucket: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """[3, H, W] in [-1, 1]: the reference covering ``bucket``, centre-cropped (mirrored)."""
    cover, _ = cover_crop_box(size, bucket)
    img, _ = resize_and_crop(load_image(path, min_size=cover), bucket)
    x = image_to_tensor(img)
    return x.flip(-1) if flip else x


def reference_jobs(planned) -> list[LatentJob]:
    """One ``LatentJob`` per reference latent of the planned entries (duplicates are fine:
    the cache encodes a key once)."""
    jobs = []
    for p in planned:
        for path, size, key, flip_key in p.refs:
            label = f"{path} (reference of {p.record.path})"
            jobs.append(LatentJob(key, p.bucket, partial(reference_pixels, path, size, p.bucket), label))
            if flip_key is not None:
                jobs.append(LatentJob(flip_key, p.bucket, partial(reference_pixels, path, size, p.bucket, True),
                                      label + " (mirrored)"))
    return jobs


def undecodable_references(planned, latent_cache: LatentCache) -> list[tuple[str, str]]:
    """(reference file, reason) of each reference that does not decode, among those whose
    latents are not cached yet; the caller leaves their targets out."""
    misses: dict[Path, Path] = {}
    for p in planned:
        for path, _size, key, flip_key in p.refs:
            if not latent_cache.path(key).is_file() or (flip_key and not latent_cache.path(flip_key).is_file()):
                misses.setdefault(path, p.record.path)
    return [(f, f"{why} (reference image of {misses[Path(f)]}, left out with it)")
            for f, why in undecodable(list(misses))]


def stack_references(entries, flips: list[bool]) -> list[torch.Tensor]:
    """Per reference slot, the batch's latents [B, C, h, w] (mirrored where the sample is);
    empty for ordinary data. All entries of a batch share bucket and reference count."""
    count = len(entries[0].references)
    return [torch.stack([(e.flipped_references if f else e.references)[k] for e, f in zip(entries, flips)])
            for k in range(count)]
