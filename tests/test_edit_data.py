"""Paired (edit) datasets: control folders beside the targets, kohya repeat folders, several
references, and every file that is missing, extra, ambiguous or broken named in a warning or
an error (real images on disk, the demo codec and text encoder)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.config import TrainingConfig
from trainer_core.data.dataset import prepare_dataset
from trainer_core.data.images import ImageError
from trainer_core.data.scan import scan
from trainer_core.data.survey import survey
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder


def _img(path: Path, colour=(200, 30, 30), size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _config(root: Path, **data) -> TrainingConfig:
    return TrainingConfig.from_dict({"data": {"path": str(root), "control_images": True,
                                              "buckets": {"resolutions": [64], "step": 16, "min_side": 16}, **data}})


def _prepare(root: Path, cache: Path, **data):
    return prepare_dataset(_config(root, **data).data, DctCodec(), HashTextEncoder(), cache_dir=cache,
                           pixel_multiple=16, seed=0)


def test_control_folders_pair_by_stem_inside_repeat_folders(tmp_path):
    root = tmp_path / "data"
    _img(root / "3_edit" / "a.png")
    _img(root / "3_edit" / "control" / "a.jpg", (10, 200, 10))  # any extension
    _img(root / "b.png")
    _img(root / "control_1" / "b.png", (10, 10, 200))
    _img(root / "control_2" / "b.webp", (200, 200, 10))
    (root / "b.txt").write_text("make it blue")
    found = scan(root, controls=True)
    recs = {r.path.name: r for r in found.records}
    assert set(recs) == {"a.png", "b.png"}  # reference images are never targets
    assert recs["a.png"].references == (root / "3_edit" / "control" / "a.jpg",) and recs["a.png"].repeats == 3
    assert recs["b.png"].references == (root / "control_1" / "b.png", root / "control_2" / "b.webp")
    assert recs["b.png"].caption == "make it blue"
    ds = _prepare(root, tmp_path / "cache")
    by_name = {e.source.name: e for e in ds.entries}
    assert len(by_name["b.png"].references) == 2
    for ref in by_name["b.png"].references:
        assert ref.shape == by_name["b.png"].latent.shape  # bucketed with their target
    # the reference latent is its own image's encoding, in the target's bucket
    blue = DctCodec().encode(torch.tensor([0.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 64, 64)
                             + torch.tensor([10, 10, 200])[None, :, None, None] / 127.5 - 1)[0]
    assert torch.allclose(by_name["b.png"].references[0], blue, atol=1e-4)
    # batches group samples by bucket and reference count
    for i in range(ds.batches_per_epoch):
        b = ds.batch(i, torch.Generator().manual_seed(i))
        assert len(b.references) == (2 if b.sources == [str(root / "b.png")] else 1)
    assert ds.summary()["references"] == {1: 1, 2: 1}


def test_missing_extra_and_stray_files_are_named(tmp_path, caplog):
    root = tmp_path / "data"
    _img(root / "a.png")
    _img(root / "control" / "a.png")
    _img(root / "lonely.png")  # no reference
    _img(root / "control" / "orphan.png")  # no target
    (root / "control" / "a.txt").write_text("caption in the wrong place")
    _img(root / "control" / "deeper" / "x.png")
    with caplog.at_level(logging.WARNING):
        found = survey(root, controls=True)
    assert [r.path.name for r in found.records] == ["a.png"]
    text = caplog.text
    assert "lonely.png" in text and "no reference image" in text
    assert "orphan.png: reference image without a target image named orphan" in text
    assert "a.txt: not an image, in a control folder" in text
    assert "x.png: inside a subfolder of a control folder" in text
    skipped = {Path(s["file"]).name for s in found.skipped_files()}
    assert {"lonely.png", "orphan.png", "a.txt", "x.png"} <= skipped


def test_no_pairs_and_ambiguous_references_stop_with_the_files(tmp_path):
    root = tmp_path / "data"
    _img(root / "a.png")
    with pytest.raises(ValueError, match="no image in .* has a reference image"):
        scan(root, controls=True)
    _img(root / "control" / "a.png")
    _img(root / "control" / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png are both references for 'a'"):
        scan(root, controls=True)


def test_unreadable_reference_leaves_its_target_out(tmp_path, caplog):
    root = tmp_path / "data"
    for name in ("a", "b"):
        _img(root / f"{name}.png")
        _img(root / "control" / f"{name}.png")
    (root / "control" / "b.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING):
        ds = _prepare(root, tmp_path / "cache")
    assert [e.source.name for e in ds.entries] == ["a.png"]
    assert "control/b.png" in caplog.text and f"reference image of {root / 'b.png'}" in caplog.text
    with pytest.raises(ImageError, match="control/b.png"):
        _prepare(root, tmp_path / "cache2", strict=True)
    # truncated after the header: found by the decode check before any encoding
    data = (root / "control" / "a.png").read_bytes()
    _img(root / "control" / "b.png", size=(640, 640))
    (root / "control" / "b.png").write_bytes((root / "control" / "b.png").read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        ds = _prepare(root, tmp_path / "cache3")
    assert [e.source.name for e in ds.entries] == ["a.png"] and data


def test_reference_cache_is_content_keyed_and_flip_mirrors_references(tmp_path):
    root = tmp_path / "data"
    _img(root / "a.png")
    ref = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    (root / "control").mkdir(parents=True)
    ref.save(root / "control" / "a.png")
    ds = _prepare(root, tmp_path / "cache", augment={"flip": True})
    e = ds.entries[0]
    assert torch.allclose(e.flipped_references[0], DctCodec().encode(
        torch.from_numpy(np.asarray(ref)[:, ::-1].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1)[0], atol=1e-4)
    again = _prepare(root, tmp_path / "cache", augment={"flip": True})
    assert again.summary()["cache"]["latent_misses"] == 0
    _img(root / "control" / "a.png", (0, 0, 250))  # an edited reference is encoded again
    edited = _prepare(root, tmp_path / "cache", augment={"flip": True})
    assert edited.summary()["cache"]["latent_misses"] == 2 and not torch.equal(edited.entries[0].references[0],
                                                                                e.references[0])


def test_control_folders_without_the_option_are_trained_as_targets_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    _img(root / "a.png")
    _img(root / "control" / "a.png")
    with caplog.at_level(logging.WARNING):
        found = survey(root)
    assert len(found.records) == 2
    assert "data.control_images is off" in caplog.text and str(root / "control" / "a.png") in caplog.text
