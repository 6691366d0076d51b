"""Every bad input of docs/durability.md, end to end through ``train_lora`` on the tiny model:
the message names the file or setting and what to do, and no finished work is lost."""
from __future__ import annotations

import errno
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

import trainer_core.checkpoint as checkpoint
from trainer_core.checkpoint import list_checkpoints, load_checkpoint
from trainer_core.config import ConfigError
from trainer_core.loop import Callback


@pytest.fixture
def bare(tiny_training):
    """A TinyTraining whose data folder starts empty."""
    shutil.rmtree(tiny_training.data)
    tiny_training.data.mkdir()
    return tiny_training


def _img(path, size=(64, 64), mode="RGB", **save):
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, **save)
    return path


def test_empty_folder(bare):
    with pytest.raises(ValueError, match=r"data.*contains no supported images; put images with extensions"):
        bare.train(bare.config())


def test_no_supported_images(bare):
    (bare.data / "notes.txt").write_text("hello")
    _img(bare.data / "anim.gif")
    with pytest.raises(ValueError, match=r"contains no supported images.*\.png, \.jpg"):
        bare.train(bare.config())


_BROKEN = {
    "empty.png": (b"", "the file is empty (0 bytes)"),
    "text.jpg": (b"this is a text file, not a picture", "not a recognised image format"),
}


def _break(folder):
    for name, (content, _) in _BROKEN.items():
        (folder / name).write_bytes(content)
    good = _img(folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    return {**{n: why for n, (_, why) in _BROKEN.items()}, "cut.png": "image file is truncated"}


def test_unreadable_images_are_skipped_named_and_recorded(tiny_training, caplog):
    reasons = _break(tiny_training.data)
    caplog.set_level(logging.WARNING)
    result = tiny_training.train(tiny_training.config(**{"train.steps": 2}))
    assert (result.reason, result.dataset_summary["images"]) == ("finished", 4)
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1
    for name, why in reasons.items():
        assert f"{tiny_training.data / name}: {why}" in warnings[0]
    state = json.loads((tiny_training.out / "run" / "training_state.json").read_text())
    skipped = {s["file"]: s["reason"] for s in state["dataset"]["skipped_files"]}
    for name, why in reasons.items():
        assert why in skipped[str(tiny_training.data / name)]


def test_strict_stops_naming_every_unreadable_image(tiny_training):
    reasons = _break(tiny_training.data)
    with pytest.raises(ValueError, match="data.strict is on") as e:
        tiny_training.train(tiny_training.config(**{"data.strict": True}))
    for name, why in reasons.items():
        assert f"{tiny_training.data / name}: {why}" in str(e.value)
    assert not (tiny_training.out / "run" / "lora_final.safetensors").exists()


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty \\(0 bytes\\)"),
    (b"this is a text file, not a picture", "not a recognised image format"),
], ids=["zero_bytes", "not_an_image"])
def test_no_readable_image_stops(bare, content, why):
    (bare.data / "broken.png").write_bytes(content)
    with pytest.raises(ValueError, match=f"(?s)no usable image.*broken.png: {why}.*re-export them"):
        bare.train(bare.config())


def test_unusual_modes_are_converted(bare):
    _img(bare.data / "cmyk.jpg", mode="CMYK")
    _img(bare.data / "grey.png", mode="L")
    _img(bare.data / "palette.png", mode="P")
    _img(bare.data / "alpha.png", mode="RGBA")
    sixteen = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(sixteen).save(bare.data / "deep.png")
    assert Image.open(bare.data / "deep.png").mode.startswith("I")
    result = bare.train(bare.config(**{"train.steps": 1}))
    assert result.dataset_summary["images"] == 5 and result.reason == "finished"


def test_exif_rotation_is_applied(bare):
    _img(bare.data / "wide.jpg", size=(96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 96x48, shown 48x96
    _img(bare.data / "turned.jpg", size=(96, 48), exif=exif.tobytes())
    buckets = bare.train(bare.config(**{"train.steps": 1})).dataset_summary["buckets"]
    (a, b) = sorted(buckets)
    assert a.split("x") == b.split("x")[::-1] and a != b  # one landscape, one portrait


def test_too_small_images_are_skipped_with_a_warning(tiny_training, caplog):
    _img(tiny_training.data / "tiny.png", size=(16, 16))
    caplog.set_level(logging.WARNING)
    result = tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert result.dataset_summary["images"] == 4
    assert "too small for a bucket" in caplog.text and "tiny.png" in caplog.text and "allow_upscale" in caplog.text


def test_only_too_small_images_stop(bare):
    _img(bare.data / "tiny.png", size=(16, 16))
    with pytest.raises(ValueError, match=r"no image in .* fits any bucket.*allow_upscale"):
        bare.train(bare.config())


def test_huge_image_is_downscaled_while_decoding(tiny_training):
    arr = np.zeros((2500, 10000, 3), dtype=np.uint8)
    arr[:, ::100] = 255
    Image.fromarray(arr).save(tiny_training.data / "huge.jpg", quality=50)
    result = tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert result.dataset_summary["images"] == 5
    assert all(int(s) <= 256 for key in result.dataset_summary["buckets"] for s in key.split("x"))


def test_missing_captions_warn_listing_files(tiny_training, caplog):
    (tiny_training.data / "img1.txt").unlink()
    (tiny_training.data / "img3.txt").unlink()
    caplog.set_level(logging.WARNING)
    tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert "2 image(s) have no caption file" in caplog.text and "'sks'" in caplog.text
    assert "img1.png" in caplog.text and "img3.png" in caplog.text


def test_non_utf8_caption_is_read_as_cp1252_with_a_warning(tiny_training, caplog):
    (tiny_training.data / "img2.txt").write_bytes("sks, caf\xe9".encode("cp1252"))
    caplog.set_level(logging.WARNING)
    result = tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert result.reason == "finished"
    assert f"{tiny_training.data / 'img2.txt'}: not UTF-8 (byte 8), read as Windows-1252" in caplog.text


def test_caption_cut_by_the_text_encoder_names_its_file(tiny_training, caplog):
    words = " ".join(f"word{i}" for i in range(30))  # the tiny text encoder reads 16 words
    (tiny_training.data / "img1.txt").write_text(f"sks, {words}")
    caplog.set_level(logging.WARNING)
    tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert f"{tiny_training.data / 'img1.txt'}: keeps 16 of its 31 words" in caplog.text


def test_zero_repeat_folder_is_skipped_not_trained_once(tiny_training, caplog):
    _img((tiny_training.data / "0_unused").mkdir() or tiny_training.data / "0_unused" / "x.png")
    caplog.set_level(logging.WARNING)
    result = tiny_training.train(tiny_training.config(**{"train.steps": 1}))
    assert result.dataset_summary["images"] == 4
    assert "0 repeats" in caplog.text and str(tiny_training.data / "0_unused") in caplog.text


def test_duplicate_stems(tiny_training):
    _img(tiny_training.data / "img0.jpg")
    with pytest.raises(ValueError, match=r"img0.*img0.*share the name 'img0'.*rename or delete"):
        tiny_training.train(tiny_training.config())


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "../up"])
def test_output_name_with_path_parts(tiny_training, name):
    with pytest.raises(ConfigError, match="train.output_name.*plain name without path separators"):
        tiny_training.config(**{"train.output_name": name})


class _EditDataset(Callback):
    """Changes the dataset folder after step 1: edits an image and a caption, adds a file."""

    def __init__(self, folder):
        self.folder = folder

    def on_step_end(self, state, logs):
        if state.step == 1:
            _img(self.folder / "img0.png", size=(64, 64), mode="L")
            (self.folder / "img1.txt").write_text("something else entirely")
            _img(self.folder / "new.png")


def test_dataset_changes_during_training_do_not_affect_the_run(tiny_training, caplog):
    copy = tiny_training.root / "data_copy"
    shutil.copytree(tiny_training.data, copy)
    ref = tiny_training.train(tiny_training.config(**{"train.output_name": "ref"}))
    caplog.set_level(logging.WARNING)
    cfg = tiny_training.config(**{"train.output_name": "edited", "data.path": str(copy)})
    edited = tiny_training.train(cfg, callbacks=[_EditDataset(copy)])
    a, b = ref.network.state_dict(), edited.network.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert "changed during training" in caplog.text
    for line in ("added new.png", "modified img0.png", "modified img1.txt"):
        assert line in caplog.text


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_training, monkeypatch):
    real = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a file, then ENOSPC
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    cfg = tiny_training.config(**{"train.steps": 6, "train.save_every": 2})
    with pytest.raises(OSError) as e:
        tiny_training.train(cfg)
    run = tiny_training.out / "run"
    assert e.value.errno == errno.ENOSPC
    assert "disk full while saving in" in str(e.value) and str(run) in str(e.value)
    assert "checkpoint_000002 is intact" in str(e.value)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert load_checkpoint(run / "checkpoint_000002").step == 2
    assert not (run / "checkpoint_000004").exists()  # the partial folder is cleaned up
    monkeypatch.setattr(checkpoint, "save_file", real)
    resumed = tiny_training.train(cfg)  # space is back: it continues from step 2
    assert (resumed.steps, resumed.reason) == (6, "finished")
