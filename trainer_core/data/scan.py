"""Finding the training images and their captions in a folder.

Layout (kohya-compatible): images anywhere under the folder, each with an optional
same-stem caption file next to it (``a.png`` + ``a.txt``). A subfolder named ``N_name``
(e.g. ``10_sks dog``) repeats every image below it N times per epoch; the nearest such
folder wins, and the dataset folder's own name never counts. ``0_name`` means 0 repeats:
its images are not used (warned). Names starting with a dot (hidden files,
``.latent_cache``, macOS ``._x.jpg``) are ignored.

Symbolic links: nothing whose real path lies outside the dataset folder is read, listed
or hashed (such links are skipped and named in one warning), and every real folder is
visited once, so a link cycle cannot hang the scan. Links that stay inside work.

Which files are images is decided by ``formats.image_extensions()``; every other file,
and every caption file without an image, is listed in one warning (``FolderScan``).

Edit datasets (``controls=True``, ``data.control_images``): images in ``control/`` or
``control_N/`` folders are the reference images of the same-stem targets beside them
(``pairs.py``); each record carries its references.
"""
from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .formats import image_extensions, why_ignored
from .pairs import (in_control_folder, no_pairs_message, ordinary_controls_warning, pair, split_controls,
                    unpaired_warning)

log = logging.getLogger(__name__)
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def __getattr__(name: str):
    if name == "IMAGE_EXTENSIONS":  # computed from the installed Pillow on first use
        return image_extensions()
    raise AttributeError(name)


def listing(items) -> str:
    """Every item on its own indented line (messages name every file, never 'the first N')."""
    return "".join(f"\n  {item}" for item in items)


@dataclass(frozen=True)
class ImageRecord:
    """One image file. ``caption`` is the stripped caption text, or None when there is
    no caption file (``caption_path``: that file); ``content_hash`` is the sha256 (hex) of
    the file's bytes, so any edit to the image changes every cache key derived from it."""

    path: Path
    caption: str | None
    repeats: int
    content_hash: str
    caption_path: Path | None = None
    references: tuple[Path, ...] = ()
    reference_hashes: tuple[str, ...] = ()


@dataclass
class FolderScan:
    """What ``scan`` found: the usable ``records`` and everything it left out, each with
    a reason (``ignored``: (file, reason); ``outside_links``: "link -> target";
    ``zero_repeats``: folder -> images not used; ``caption_fallbacks``: caption files read
    as Windows-1252; ``unpaired``: targets of an edit dataset without a reference image;
    ``ordinary_controls``: images in control folders trained as targets because
    ``controls`` was off)."""

    root: Path
    records: list[ImageRecord]
    ignored: list[tuple[str, str]] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)
    zero_repeats: dict[str, int] = field(default_factory=dict)
    caption_fallbacks: list[str] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    ordinary_controls: list[str] = field(default_factory=list)

    def skipped_files(self) -> list[dict[str, str]]:
        """Every file or folder not used, with the reason (for training_state.json)."""
        out = [{"file": f, "reason": r} for f, r in self.ignored]
        out += [{"file": link, "reason": "symbolic link leading outside the dataset folder"}
                for link in self.outside_links]
        out += [{"file": d, "reason": f"folder with 0 repeats ({n} image(s) not used)"}
                for d, n in self.zero_repeats.items()]
        out += [{"file": f, "reason": "no reference image (control/ folder) for this target"} for f in self.unpaired]
        return out

    def log_warnings(self) -> None:
        """One warning per kind of surprise, each naming every file."""
        if self.outside_links:
            log.warning("%d symbolic link(s) in %s lead outside the dataset folder; they are not followed, "
                        "nothing behind them is read (copy those files into the folder to use them):%s",
                        len(self.outside_links), self.root, listing(self.outside_links))
        if self.zero_repeats:
            log.warning("%d folder(s) are named '0_...', i.e. 0 repeats: their images are not used (rename a "
                        "folder to '1_...' to train on it once per epoch):%s", len(self.zero_repeats),
                        listing(f"{d} ({n} image(s))" for d, n in self.zero_repeats.items()))
        if self.ignored:
            log.warning("%d file(s) in %s are not used (images are %s):%s", len(self.ignored), self.root,
                        " ".join(image_extensions()), listing(f"{f}: {r}" for f, r in self.ignored))
        if self.unpaired:
            log.warning("%s%s", unpaired_warning(self.unpaired, self.root), listing(self.unpaired))
        if self.ordinary_controls:
            log.warning("%s%s", ordinary_controls_warning(len(self.ordinary_controls)), listing(self.ordinary_controls))
        if self.caption_fallbacks:
            log.warning("%d caption file(s) are not UTF-8 or UTF-16; they were read as Windows-1252 (check the "
                        "accents, and re-save them as UTF-8):%s", len(self.caption_fallbacks),
                        listing(self.caption_fallbacks))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def repeats_for(image: Path, root: Path) -> int:
    """N of the nearest ``N_name`` folder between ``image`` and ``root`` (exclusive), else 1.
    0 for a ``0_name`` folder (the caller skips those images)."""
    folder = repeat_folder(image, root)
    return 1 if folder is None else int(_REPEAT_FOLDER.match(folder.name).group(1))


def repeat_folder(image: Path, root: Path) -> Path | None:
    """The nearest ``N_name`` folder between ``image`` and ``root`` (exclusive), or None."""
    for parent in image.relative_to(root).parents:
        if parent == Path("."):
            break
        if _REPEAT_FOLDER.match(parent.name):
            return root / parent
    return None


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """(text, note): UTF-8 with or without BOM, UTF-16 with BOM; any other bytes are read
    as Windows-1252 (bytes it does not define become U+FFFD) and ``note`` says so."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), None
            except UnicodeDecodeError as e:
                return data.decode("cp1252", errors="replace"), f"has a {encoding} mark but invalid bytes ({e.reason})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return data.decode("cp1252", errors="replace"), f"not UTF-8 (byte {e.start})"


def read_caption(path: Path, notes: list[str] | None = None) -> str:
    """Caption text, stripped (see ``decode_caption``); a fallback decoding is appended
    to ``notes`` as ``"<file>: <why>"``, or logged when ``notes`` is None."""
    text, note = decode_caption(path.read_bytes())
    if note is not None:
        if notes is None:
            log.warning("caption file %s is %s; read as Windows-1252 (re-save it as UTF-8)", path, note)
        else:
            notes.append(f"{path}: {note}, read as Windows-1252")
    return text.strip()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def walk_files(root: Path, outside: list[str] | None = None, notes: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every non-hidden file under ``root`` whose real path is inside ``root``, sorted
    depth-first. Each real folder is visited once (a link to a folder already seen, e.g.
    a cycle, is noted in ``notes`` and not entered); links leading outside go to
    ``outside`` (``"link -> target"``) and are never followed."""
    root_real = root.resolve()
    seen = {root_real}
    files: list[Path] = []

    def visit(folder: Path) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if notes is not None:
                notes.append((str(folder), f"cannot be listed ({e.strerror or e})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                real = path.resolve()
            except (OSError, RuntimeError):  # a link loop
                real = None
            if real is None:
                if notes is not None:
                    notes.append((str(path), "symbolic link loop"))
                continue
            if not _inside(real, root_real):  # a symbolic link (or Windows junction) leading out
                if outside is not None:
                    outside.append(f"{path} -> {real}")
                continue
            if not real.exists():
                if notes is not None:
                    notes.append((str(path), "broken symbolic link"))
                continue
            if real.is_dir():
                if real in seen:
                    if notes is not None:
                        notes.append((str(path), f"the same folder as one already scanned ({real.relative_to(root_real)})"))
                    continue
                seen.add(real)
                visit(path)
            elif real.is_file():
                files.append(path)

    visit(root)
    return files


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


def no_images(root: Path, why: str, scan: FolderScan | None = None) -> ValueError:
    left_out = ""
    if scan is not None and scan.skipped_files():
        left_out = "; left out:" + listing(f"{s['file']}: {s['reason']}" for s in scan.skipped_files())
    return ValueError(
        f"dataset folder {root} {why}; put images with extensions {', '.join(image_extensions())} "
        f"(any case, subfolders allowed) in it, or fix data.path{left_out}"
    )


def _caption_ext(caption_extension: str) -> str:
    return caption_extension if caption_extension.startswith(".") else "." + caption_extension


def scan(path: Path | str, caption_extension: str = ".txt", controls: bool = False) -> FolderScan:
    """All usable images under ``path`` (recursive, sorted by path) and what was left out.
    ``controls``: pair each target with the images of the control folders beside it and
    leave out targets without one (``pairs.py``).

    Raises ValueError naming the folder when it does not exist or holds no usable image
    (listing what was left out), and naming both files for duplicate stems.
    """
    root = Path(path).expanduser()
    if not str(path).strip():
        raise no_images(root, "is not set (data.path is empty)")
    if not root.is_dir():
        raise no_images(root, "does not exist or is not a folder")
    result = FolderScan(root, [])
    files = walk_files(root, result.outside_links, result.ignored)
    ext = _caption_ext(caption_extension)
    allowed = set(image_extensions())
    references: dict[Path, tuple[Path, ...]] = {}
    if controls:
        files, control_files = split_controls(files, root, allowed, result.ignored)
    images = sorted(f for f in files if f.suffix.lower() in allowed)
    if controls:
        references = pair(images, control_files, result.ignored)
    else:
        result.ordinary_controls = [str(f) for f in images if in_control_folder(f, root)]
    stems = {(f.parent, f.stem) for f in images}
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ext.lower():
            if (f.parent, f.stem) not in stems:
                result.ignored.append((str(f), "caption file without an image next to it"))
        elif suffix not in allowed:
            result.ignored.append((str(f), why_ignored(suffix)))
    _check_duplicate_stems(images)
    present = set(files)
    for image in images:
        repeats = repeats_for(image, root)
        if repeats == 0:
            folder = str(repeat_folder(image, root))
            result.zero_repeats[folder] = result.zero_repeats.get(folder, 0) + 1
            continue
        if controls and image not in references:
            result.unpaired.append(str(image))
            continue
        caption_file = image.with_suffix(ext)
        has_caption = caption_file in present
        caption = read_caption(caption_file, result.caption_fallbacks) if has_caption else None
        refs = references.get(image, ())
        result.records.append(ImageRecord(image, caption, repeats, file_sha256(image),
                                          caption_file if has_caption else None, refs,
                                          tuple(file_sha256(r) for r in refs)))
    if controls and not result.records and result.unpaired:
        raise ValueError(no_pairs_message(root))
    if not result.records:
        raise no_images(root, "contains no supported images", result)  # it lists what was left out
    return result


def scan_folder(path: Path | str, caption_extension: str = ".txt", controls: bool = False) -> list[ImageRecord]:
    """``scan(...).records``, with its warnings logged."""
    result = scan(path, caption_extension, controls)
    result.log_warnings()
    return result.records
