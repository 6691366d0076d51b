"""Paired (edit) datasets: each target image with one or more reference (control) images.

Layout (``data.control_images``): beside the target images of a folder sits a folder
``control/`` (one reference per target) or ``control_1/``, ``control_2/``, ... (several;
``control/`` counts as the first), holding images with the *same stem* as their target
(any image extension: ``a.png`` ↔ ``control/a.jpg``). The target's caption describes the
edit. In kohya ``N_name`` repeat folders the control folders go inside each image folder
(``10_edit/a.png`` + ``10_edit/control/a.png``): a control folder belongs to the folder it
is in, and its images are never training targets themselves.

What is not right is said, naming the files: a target with no reference is left out (one
warning; none paired at all stops the run); a reference with no target, a non-image file
or a subfolder inside a control folder is listed with the other unused files; two
references with one stem in one control folder stop the run (which one is meant?); an
unreadable reference leaves its target out like an unreadable image (``survey.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

CONTROL_FOLDER = re.compile(r"^control(?:_(\d+))?$")


def control_slot(name: str) -> int | None:
    """Order of a control folder: ``control`` 0, ``control_N`` N; None for other names."""
    m = CONTROL_FOLDER.match(name)
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def in_control_folder(path: Path, root: Path) -> bool:
    """Whether any folder between ``root`` (exclusive) and ``path`` is a control folder."""
    return any(control_slot(part) is not None for part in path.relative_to(root).parts[:-1])


def split_controls(files: list[Path], root: Path, image_exts: set[str],
                   ignored: list[tuple[str, str]]) -> tuple[list[Path], list[Path]]:
    """``(other files, reference images)``: reference images are the images directly inside a
    control folder; anything else inside one (non-images, deeper subfolders) joins
    ``ignored`` with the reason."""
    others, controls = [], []
    for f in files:
        if not in_control_folder(f, root):
            others.append(f)
        elif control_slot(f.parent.name) is None or in_control_folder(f.parent, root):
            ignored.append((str(f), "inside a subfolder of a control folder (reference images sit directly in "
                                    "control/ or control_N/ beside their target images)"))
        elif f.suffix.lower() not in image_exts:
            ignored.append((str(f), "not an image, in a control folder (captions go next to the target image)"))
        else:
            controls.append(f)
    return others, controls


def pair(images: list[Path], controls: list[Path], ignored: list[tuple[str, str]]) -> dict[Path, tuple[Path, ...]]:
    """target → its reference files in slot order (targets without one are absent).
    References with no target of their stem join ``ignored``; two references of one stem
    in one control folder raise ValueError naming both."""
    by_key: dict[tuple[Path, str], Path] = {}
    for c in sorted(controls):
        key = (c.parent, c.stem)
        if key in by_key:
            raise ValueError(f"{by_key[key]} and {c} are both references for {c.stem!r} in {c.parent}; "
                             "keep one of them (which one is meant is ambiguous)")
        by_key[key] = c
    targets = {(i.parent, i.stem): i for i in images}
    out: dict[Path, list[tuple[int, Path]]] = {}
    for (folder, stem), ref in by_key.items():
        target = targets.get((folder.parent, stem))
        if target is None:
            ignored.append((str(ref), f"reference image without a target image named {stem}.* in {folder.parent}"))
            continue
        out.setdefault(target, []).append((control_slot(folder.name), ref))
    return {t: tuple(r for _, r in sorted(refs)) for t, refs in out.items()}


def unpaired_warning(unpaired: list[str], root: Path) -> str:
    return (f"{len(unpaired)} image(s) in {root} have no reference image (data.control_images is on: each target "
            "needs a same-name image in a control/ or control_N/ folder beside it); they are not used:")


def no_pairs_message(root: Path) -> str:
    return (f"data.control_images is on but no image in {root} has a reference image: put each target's reference "
            "under the same name in a 'control' folder beside it (e.g. a.png + control/a.png; control_1/, control_2/ "
            "for several references; inside each N_name repeat folder), or turn data.control_images off")


def ordinary_controls_warning(count: int) -> str:
    return (f"{count} image(s) sit in folders named control/control_N but data.control_images is off: they are "
            "trained as ordinary target images; turn data.control_images on (Dataset node: control_images) to use "
            "them as the reference images of an edit LoRA:")
