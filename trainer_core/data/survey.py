"""Which scanned images can be used, and what happens to the others.

An unreadable image (0 bytes, truncated, not an image despite its extension, a decoder
error) never stops a run that still has usable images: it is skipped, and one warning
names every such file with its reason. The run stops when no usable image is left, or
when ``data.strict`` is on (then the error names every bad file). Animations are left
out like any other ignored file (``FolderScan.ignored``, one warning). An edit dataset's
reference image that cannot be read (or is an animation) leaves its target out the same
way, the reference file named with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .images import AnimationError, ImageError, image_size, load_image
from .scan import FolderScan, ImageRecord, listing, no_images, scan

log = logging.getLogger(__name__)

_FIX = "re-export them (e.g. save them again as PNG or JPEG) or delete them from the dataset folder"


@dataclass
class Survey:
    """A ``FolderScan`` narrowed to the images whose header reads: ``records`` with their
    upright ``sizes``; ``unreadable``: (file, reason) of every image left out as broken;
    ``reference_sizes``: upright size of every reference image of the kept records."""

    scan: FolderScan
    records: list[ImageRecord]
    sizes: list[tuple[int, int]]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    reference_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def skipped_files(self) -> list[dict[str, str]]:
        """Every file not used, with its reason (what ``training_state.json`` lists)."""
        return self.scan.skipped_files() + [{"file": f, "reason": f"cannot be read: {r}"} for f, r in self.unreadable]


def probe(result: FolderScan) -> Survey:
    """Read every image's header: animations join ``result.ignored``, unreadable files
    ``Survey.unreadable``. Nothing is logged or raised here (see ``settle``)."""
    survey = Survey(result, [], [])
    for rec in result.records:
        try:
            size = image_size(rec.path)
        except AnimationError as e:
            result.ignored.append((str(rec.path), e.reason))
            continue
        except ImageError as e:
            survey.unreadable.append((str(rec.path), e.reason))
            continue
        ref_sizes = {}
        for ref in rec.references:
            try:
                ref_sizes[ref] = image_size(ref)
            except ImageError as e:  # AnimationError included: a reference is one still image
                survey.unreadable.append((str(ref), f"{e.reason} (reference image of {rec.path}, left out with it)"))
                break
        if len(ref_sizes) < len(rec.references):
            continue
        survey.reference_sizes.update(ref_sizes)
        survey.records.append(rec)
        survey.sizes.append(size)
    if not survey.records and not survey.unreadable:
        raise no_images(result.root, "contains no supported still images", result)
    return survey


def undecodable(paths: list[Path]) -> list[tuple[str, str]]:
    """(file, reason) of every image in ``paths`` that does not decode (JPEGs are decoded
    at 1/8 scale): run before the first encode, so a truncated file is found now, not
    after minutes of VAE work."""
    bad = []
    for path in dict.fromkeys(paths):
        try:
            load_image(path, min_size=(1, 1))
        except ImageError as e:
            bad.append((str(path), e.reason))
    return bad


def settle(root: Path | str, bad: list[tuple[str, str]], *, strict: bool, usable: int) -> None:
    """Stop (``ImageError`` naming every bad file) when ``strict`` or when no usable image
    is left; otherwise one warning naming every skipped file and its reason."""
    if not bad:
        return
    names = listing(f"{f}: {r}" for f, r in bad)
    if strict:
        raise ImageError(f"{len(bad)} image(s) in {root} cannot be read and data.strict is on:{names}\n"
                         f"Fix: {_FIX}, or turn data.strict off to skip them.")
    if usable == 0:
        raise ImageError(f"no usable image in {root}: all {len(bad)} image(s) cannot be read:{names}\nFix: {_FIX}.")
    log.warning("skipping %d image(s) that cannot be read (training continues with the other %d; set data.strict "
                "to stop instead). To use them, %s:%s", len(bad), usable, _FIX, names)


def survey(path: Path | str, caption_extension: str = ".txt", *, strict: bool = False,
           controls: bool = False) -> Survey:
    """``scan`` + ``probe`` + ``settle`` (headers only, nothing decoded), with the scan's
    warnings logged: what the Dataset node reports before any model is loaded."""
    result = probe(scan(path, caption_extension, controls))
    result.scan.log_warnings()
    settle(path, result.unreadable, strict=strict, usable=len(result.records))
    return result
