"""What a dataset folder holds, before any model loads: the summary the command line prints.

``overview(cfg)`` scans the folder, reads every image header and chooses the buckets the way
``prepare_dataset`` does (nothing is decoded or encoded), so a wrong folder, missing captions
or images too small for the buckets show up in seconds instead of after a model load.
``format_overview`` renders it as a few lines::

    dataset /data/dog: 12 images (8 × 1 repeat, 4 × 3 repeats) → 20 samples per epoch
      captions: 10 found, 2 missing (trained on the trigger/class words): b.png, c.png
      buckets: 512x512 ×8, 384x640 ×4
      skipped: 2 file(s): notes.pdf (not an image), big.gif (animation)
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..config import DataConfig
from .buckets import choose_bucket, resolutions_for
from .scan import scan
from .survey import probe

SHOW = 4  # file names listed per line before "and N more"


def overview(cfg: DataConfig) -> dict:
    """Counts of the folder as training would use it (see the module docstring)."""
    found = probe(scan(cfg.path, cfg.captions.caption_extension))
    b = cfg.buckets
    buckets: Counter = Counter()
    too_small, used = [], []
    for rec, size in zip(found.records, found.sizes):
        fits = False
        for res in resolutions_for(*size, b.resolutions, b.allow_upscale):
            bucket = choose_bucket(*size, res, b.step, b.min_side, b.max_side, b.allow_upscale)
            if bucket is None:
                too_small.append(f"{Path(rec.path).name} @ {res}")
                continue
            buckets[f"{bucket[0]}x{bucket[1]}"] += rec.repeats
            fits = True
        if fits:
            used.append(rec)
    return {
        "path": str(cfg.path),
        "images": len(used),
        "repeats": dict(sorted(Counter(r.repeats for r in used).items())),
        "samples_per_epoch": sum(buckets.values()),
        "captions_found": sum(r.caption is not None for r in used),
        "missing_captions": [Path(r.path).name for r in used if r.caption is None],
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "too_small": too_small,
        "skipped": [f"{Path(s['file']).name} ({s['reason']})" for s in found.skipped_files()],
    }


def _names(items: list[str]) -> str:
    more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def format_overview(o: dict) -> str:
    rep = ", ".join(f"{n} × {r} repeat{'s' if r != 1 else ''}" for r, n in o["repeats"].items())
    lines = [f"dataset {o['path']}: {o['images']} image(s) ({rep or 'none'}) → {o['samples_per_epoch']} "
             f"sample(s) per epoch"]
    missing = o["missing_captions"]
    line = f"  captions: {o['captions_found']} found, {len(missing)} missing"
    lines.append(line + (f" (trained on the trigger/class words alone): {_names(missing)}" if missing else ""))
    lines.append("  buckets: " + (", ".join(f"{k} ×{v}" for k, v in o["buckets"].items()) or "none"))
    if o["too_small"]:
        lines.append(f"  too small for a bucket: {_names(o['too_small'])}")
    if o["skipped"]:
        lines.append(f"  skipped {len(o['skipped'])} file(s): {_names(o['skipped'])}")
    return "\n".join(lines)
