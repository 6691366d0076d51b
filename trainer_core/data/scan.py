"""Finding the training images and their captions in a folder.

Layout (kohya-compatible): images anywhere under the folder, each with an optional
same-stem caption file next to it (``a.png`` + ``a.txt``). A subfolder named ``N_name``
(e.g. ``10_sks dog``) repeats every image below it N times per epoch; the nearest such
folder wins, and the dataset folder's own name never counts. Names starting with a dot
(hidden files, ``.latent_cache``, macOS ``._x.jpg``) are ignored.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageRecord:
    """One image file. ``caption`` is the stripped caption text, or None when there is
    no caption file; ``content_hash`` is the sha256 (hex) of the file's bytes, so any
    edit to the image changes every cache key derived from it."""

    path: Path
    caption: str | None
    repeats: int
    content_hash: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def repeats_for(image: Path, root: Path) -> int:
    """N of the nearest ``N_name`` folder between ``image`` and ``root`` (exclusive), else 1."""
    for parent in image.relative_to(root).parents:
        if parent == Path("."):
            break
        match = _REPEAT_FOLDER.match(parent.name)
        if match:
            return max(1, int(match.group(1)))
    return 1


def read_caption(path: Path) -> str:
    """Caption text, stripped. UTF-8 (a leading BOM is dropped); anything else fails."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"caption file {path} is not valid UTF-8 (byte {e.start}); open it in a text editor "
            f"and re-save it as UTF-8"
        ) from None


def _walk(root: Path) -> Iterator[Path]:
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            yield entry


def _check_duplicate_stems(images: list[Path]) -> None:
    seen: dict[tuple[Path, str], Path] = {}
    for image in images:
        key = (image.parent, image.stem)
        if key in seen:
            raise ValueError(
                f"{seen[key]} and {image} share the name {image.stem!r} in one folder, so their "
                f"caption file would be ambiguous; rename or delete one of them"
            )
        seen[key] = image


def _no_images(root: Path, why: str) -> ValueError:
    return ValueError(
        f"dataset folder {root} {why}; put images with extensions {', '.join(IMAGE_EXTENSIONS)} "
        f"(any case, subfolders allowed) in it, or fix data.path"
    )


def scan_folder(path: Path | str, caption_extension: str = ".txt") -> list[ImageRecord]:
    """All supported images under ``path`` (recursive), sorted by path.

    Raises ValueError naming the folder when it does not exist or holds no supported
    image, naming both files for duplicate stems, and naming the file for a caption that
    is not UTF-8.
    """
    root = Path(path).expanduser()
    if not str(path).strip():
        raise _no_images(root, "is not set (data.path is empty)")
    if not root.is_dir():
        raise _no_images(root, "does not exist or is not a folder")
    images = sorted(_walk(root))
    if not images:
        raise _no_images(root, "contains no supported images")
    _check_duplicate_stems(images)
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    records = []
    for image in images:
        caption_file = image.with_suffix(ext)
        caption = read_caption(caption_file) if caption_file.is_file() else None
        records.append(ImageRecord(image, caption, repeats_for(image, root), file_sha256(image)))
    return records
