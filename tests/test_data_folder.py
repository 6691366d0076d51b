"""Dataset folders that surprise: symbolic links (out of the folder, cycles), formats,
ignored files, caption encodings, 0-repeat folders. Real files and links on disk."""
from __future__ import annotations

import codecs
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from trainer_core.control import folder_snapshot
from trainer_core.data.formats import image_extensions
from trainer_core.data.scan import scan, scan_folder
from trainer_core.data.survey import survey


def _png(path, w=32, h=24, seed=0, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


# ---- symbolic links ---------------------------------------------------------------------

_WATCH: list | None = None


def _audit(event, args):
    if _WATCH is not None and event in ("open", "os.scandir", "os.listdir") and args and args[0] is not None:
        _WATCH.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else "")


sys.addaudithook(_audit)


def _touched(fn):
    """Every path ``fn`` opened or listed (Python audit events)."""
    global _WATCH
    _WATCH = []
    try:
        result = fn()
        return result, list(_WATCH)
    finally:
        _WATCH = None


def test_links_out_of_the_folder_are_never_read(tmp_path, caplog):
    outside = tmp_path / "system"
    _png(outside / "secret.png", seed=1)
    (outside / "secret.txt").write_text("private")
    root = tmp_path / "data"
    _png(root / "a.png")
    os.symlink(outside, root / "linked_dir")
    os.symlink(outside / "secret.png", root / "b.png")
    os.symlink(outside / "secret.txt", root / "a.txt")  # a caption leading out
    caplog.set_level(logging.WARNING)
    records, touched = _touched(lambda: scan_folder(root))
    assert [r.path.name for r in records] == ["a.png"] and records[0].caption is None
    assert not [p for p in touched if str(outside) in os.path.realpath(p)], touched
    warnings = [r for r in caplog.records if "lead outside the dataset folder" in r.getMessage()]
    assert len(warnings) == 1
    for name in ("linked_dir", "b.png", "a.txt"):
        assert str(root / name) in warnings[0].getMessage()
    _, touched = _touched(lambda: folder_snapshot(root))  # the change watch does not look there either
    assert not [p for p in touched if str(outside) in os.path.realpath(p)], touched


def test_link_cycles_visit_each_folder_once(tmp_path):
    root = tmp_path / "data"
    _png(root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "up")  # sub/up/sub/up/... forever (two such links: 2^depth paths)
    records = scan_folder(root)
    assert [r.path.relative_to(root).as_posix() for r in records] == ["sub/a.png"]


def test_links_inside_the_folder_still_work(tmp_path):
    root = tmp_path / "data"
    _png(root / ".store" / "kept.png", seed=2)
    (root / ".store" / "kept.txt").write_text("from the store")
    os.symlink(root / ".store", root / "5_linked")
    _png(root / "a.png", seed=3)
    os.symlink("a.png", root / "alias.png")
    os.symlink(".store", root / "again")  # the same real folder twice: scanned once
    records = scan_folder(root)
    assert [r.path.relative_to(root).as_posix() for r in records] == ["5_linked/kept.png", "a.png", "alias.png"]
    assert records[0].caption == "from the store" and records[0].repeats == 5


# ---- formats and ignored files -------------------------------------------------------------

def test_still_formats_pillow_reads_are_used(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.bmp", fmt="BMP")
    _png(tmp_path / "c.tif", fmt="TIFF")
    _png(tmp_path / "d.TIFF", fmt="TIFF", compression="tiff_lzw")
    _png(tmp_path / "e.jpeg", fmt="JPEG")
    _png(tmp_path / "f.webp", fmt="WEBP")
    expected = ["a.png", "b.bmp", "c.tif", "d.TIFF", "e.jpeg", "f.webp"]
    if ".avif" in image_extensions():
        _png(tmp_path / "g.avif", fmt="AVIF")
        expected.append("g.avif")
    found = survey(tmp_path)
    assert [r.path.name for r in found.records] == expected
    assert all(w >= 1 for w, _ in found.sizes) and found.unreadable == []


def test_ignored_files_and_lonely_captions_in_one_warning(tmp_path, caplog):
    _png(tmp_path / "a.png")
    _png(tmp_path / "anim.gif", fmt="GIF")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "moving.png", save_all=True, append_images=frames[1:])  # APNG
    frames[0].save(tmp_path / "spin.webp", save_all=True, append_images=frames[1:])
    (tmp_path / "layers.psd").write_bytes(b"8BPS" + bytes(60))
    (tmp_path / "model.xyz").write_text("?")
    (tmp_path / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "lonely.txt").write_text("a caption whose image was deleted")
    caplog.set_level(logging.WARNING)
    found = survey(tmp_path)
    assert [r.path.name for r in found.records] == ["a.png"]
    messages = [r.getMessage() for r in caplog.records if "are not used" in r.getMessage()]
    assert len(messages) == 1, caplog.text
    reasons = {f.rsplit("/", 1)[-1]: r for f, r in found.scan.ignored}
    assert set(reasons) == {"anim.gif", "moving.png", "spin.webp", "layers.psd", "model.xyz", "lonely.txt",
                            *([] if ".heic" in image_extensions() else ["photo.heic"])}
    assert all(str(tmp_path / name) in messages[0] for name in reasons)
    assert "animation (2 frames)" in reasons["moving.png"] and "animation" in reasons["spin.webp"]
    assert "PSD" in reasons["layers.psd"] and "without an image" in reasons["lonely.txt"]
    if "photo.heic" in reasons:
        assert "pillow-heif" in reasons["photo.heic"]
    assert {s["file"] for s in found.skipped_files()} == {str(tmp_path / n) for n in reasons}


# ---- captions ----------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    codecs.BOM_UTF8 + "café ☕".encode("utf-8"),
    "café ☕".encode("utf-8"),
    codecs.BOM_UTF16_LE + "café ☕".encode("utf-16-le"),
    codecs.BOM_UTF16_BE + "café ☕".encode("utf-16-be"),
], ids=["utf8_bom", "utf8", "utf16le_bom", "utf16be_bom"])
def test_unicode_caption_encodings(tmp_path, data, caplog):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(data + b"\n" if data[:2] not in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else data)
    caplog.set_level(logging.WARNING)
    assert scan_folder(tmp_path)[0].caption == "café ☕"
    assert caplog.text == ""


def test_other_caption_bytes_read_as_cp1252_with_a_warning(tmp_path, caplog):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, “quoted”".encode("cp1252"))
    caplog.set_level(logging.WARNING)
    record = scan_folder(tmp_path)[0]
    assert record.caption == "café, “quoted”"
    assert str(tmp_path / "a.txt") in caplog.text and "Windows-1252" in caplog.text


# ---- repeats -----------------------------------------------------------------------------

def test_zero_repeat_folder_is_skipped_with_a_warning(tmp_path, caplog):
    _png(tmp_path / "0_unused" / "x.png")
    _png(tmp_path / "0_unused" / "y.png", seed=1)
    _png(tmp_path / "2_used" / "z.png", seed=2)
    caplog.set_level(logging.WARNING)
    result = scan(tmp_path)
    assert [(r.path.name, r.repeats) for r in result.records] == [("z.png", 2)]
    result.log_warnings()
    assert "0 repeats" in caplog.text and str(tmp_path / "0_unused") in caplog.text and "2 image(s)" in caplog.text
    assert {"file": str(tmp_path / "0_unused"), "reason": "folder with 0 repeats (2 image(s) not used)"} \
        in result.skipped_files()


def test_only_zero_repeat_images_stop_naming_the_folder(tmp_path):
    _png(tmp_path / "0_x" / "a.png")
    with pytest.raises(ValueError, match=r"(?s)no supported images.*0_x: folder with 0 repeats"):
        scan(tmp_path)
