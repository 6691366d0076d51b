"""prepare_dataset + CachedDataset end to end: real images on disk, a real pooling codec,
a spy text encoder counting what it encodes."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer_core.config import BucketConfig, CaptionConfig, ConfigError, DataConfig
from trainer_core.data.captions import CaptionPolicy
from trainer_core.data.dataset import prepare_dataset
from trainer_core.data.images import ImageError
from trainer_core.types import TextEmbedding


# Same fakes as test_cache.py (kept local so test files stay independent).
class PoolCodec:
    """Tiny real codec: 8×8 average pool, RGB + their mean as 4 channels."""

    identity = "pool8-test"
    downscale = 8

    def __init__(self):
        self.calls = []

    def encode(self, pixels):
        self.calls.append(tuple(pixels.shape))
        x = F.avg_pool2d(pixels, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def decode(self, latents):
        return F.interpolate(latents[:, :3], scale_factor=8)


class SpyEncoder:
    identity = "spy-text-v1"

    def __init__(self, pooled=True):
        self.calls: list[list[str]] = []
        self.pooled = pooled

    def encode(self, texts):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            v = float(sum(map(ord, t)) % 97)
            out.append(TextEmbedding(torch.full((len(t.split()) + 1, 8), v), torch.full((4,), v) if self.pooled else None))
        return out


def _img(path, w, h, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    _img(root / "a.png", 96, 64, 1)
    (root / "a.txt").write_text("red ball, grass, sunny")
    _img(root / "b.jpg", 64, 96, 2)
    (root / "b.txt").write_text("sks on a chair, indoor")
    _img(root / "3_more" / "c.png", 80, 80, 3)
    (root / "3_more" / "c.txt").write_text("close up, face")
    _img(root / "d.webp", 160, 128, 4)  # no caption
    _img(root / "tiny.png", 20, 20, 5)  # smaller than min_side
    return root


def _cfg(root, **captions):
    caption_cfg = {"trigger_word": "sks", "class_word": "toy", "keep_tokens": 1}
    caption_cfg.update(captions)
    return DataConfig(
        path=str(root), batch_size=2,
        buckets=BucketConfig(resolutions=(64, 128), step=16, min_side=32, max_side=256),
        captions=CaptionConfig(**caption_cfg),
    )


def _prepare(cfg, tmp_path, codec=None, enc=None, seed=7, **kw):
    codec, enc = codec or PoolCodec(), enc or SpyEncoder()
    policy = CaptionPolicy(cfg.captions)
    extras = {"class_text": lambda c: policy.replace_trigger(c, cfg.captions.class_word)}
    ds = prepare_dataset(cfg, codec, enc, cache_dir=tmp_path / "cache", pixel_multiple=16, seed=seed,
                         extra_captions=extras, **kw)
    return ds, codec, enc


def _encoded_texts(enc):
    return [t for call in enc.calls for t in call]


def test_summary_entries_and_warnings(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds, _codec, _enc = _prepare(_cfg(folder), tmp_path)
    s = ds.summary()
    assert s["images"] == 4 and s["captions_found"] == 3
    assert [p.rsplit("/", 1)[-1] for p in s["missing_captions"]] == ["d.webp"]
    assert s["repeats"] == {1: 3, 3: 1}
    assert {x["file"].rsplit("/", 1)[-1] for x in s["skipped"]} == {"tiny.png"}
    assert "min_side" in s["skipped"][0]["reason"]
    # each image trains at every resolution whose area it reaches; only d (160x128) reaches 128²
    assert sum(s["buckets"].values()) == len(ds.entries) == 5
    assert sorted(e.source.name for e in ds.entries) == ["a.png", "b.jpg", "c.png", "d.webp", "d.webp"]
    assert len(ds) == 1 + 1 + 3 + 2
    assert caplog.text.count("no caption file") == 1 and caplog.text.count("d.webp") == 1
    assert "tiny.png" in caplog.text and "min_side" in caplog.text
    for e in ds.entries:
        assert e.latent.shape == (4, e.bucket[1] // 8, e.bucket[0] // 8)
        assert all(t.startswith("sks") for t in e.texts)
    d = [e for e in ds.entries if e.source.name == "d.webp"]
    assert {e.texts for e in d} == {("sks",)}


def test_second_run_encodes_nothing(folder, tmp_path):
    cfg = _cfg(folder, shuffle=True, shuffle_variants=3, caption_dropout=0.1)
    ds1, codec, enc = _prepare(cfg, tmp_path)
    assert codec.calls and enc.calls
    texts = _encoded_texts(enc)
    assert len(texts) == len(set(texts)) and "" in texts and "toy" in texts  # dropout + class fallback
    ds2, codec2, enc2 = _prepare(cfg, tmp_path)
    assert codec2.calls == [] and enc2.calls == []
    assert all(torch.equal(a.latent, b.latent) and a.texts == b.texts for a, b in zip(ds1.entries, ds2.entries))


def test_changed_caption_reencodes_exactly_its_texts(folder, tmp_path):
    cfg = _cfg(folder, shuffle=True, shuffle_variants=3)
    _, _, enc1 = _prepare(cfg, tmp_path)
    (folder / "a.txt").write_text("blue ball, grass, sunny")
    ds2, codec2, enc2 = _prepare(cfg, tmp_path)
    assert codec2.calls == []
    new = set(_encoded_texts(enc2))
    a_texts = {t for e in ds2.entries if e.source.name == "a.png" for t in e.texts}
    assert new == a_texts | {t.replace("sks", "toy") for t in a_texts}
    assert all("blue ball" in t for t in new) and not new & set(_encoded_texts(enc1))


def test_changed_image_bytes_reencodes_one_latent(folder, tmp_path):
    cfg = _cfg(folder)
    _prepare(cfg, tmp_path)
    _img(folder / "b.jpg", 64, 96, 99)  # same name and size, new content
    _ds, codec, enc = _prepare(cfg, tmp_path)
    assert sum(shape[0] for shape in codec.calls) == 1 and enc.calls == []


def test_step_not_multiple_of_pixel_multiple_names_field(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.buckets\.step=16.*multiple of 32"):
        prepare_dataset(_cfg(folder), PoolCodec(), SpyEncoder(), cache_dir=tmp_path, pixel_multiple=32, seed=0)


def _damage(folder):
    """b.jpg empty (fails at the header), c.png truncated (fails only when decoded)."""
    (folder / "b.jpg").write_bytes(b"")
    data = (folder / "3_more" / "c.png").read_bytes()
    (folder / "3_more" / "c.png").write_bytes(data[: len(data) // 2])


def test_broken_images_are_skipped_and_named_in_one_warning(folder, tmp_path, caplog):
    _damage(folder)
    with caplog.at_level(logging.WARNING):
        ds, _, _ = _prepare(_cfg(folder), tmp_path)
    assert sorted({e.source.name for e in ds.entries}) == ["a.png", "d.webp"]
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "skipping 2 image(s)" in warnings[0] and "data.strict" in warnings[0]
    assert f"{folder / 'b.jpg'}: the file is empty (0 bytes)" in warnings[0]
    assert f"{folder / '3_more' / 'c.png'}: image file is truncated" in warnings[0]
    skipped = {s["file"]: s["reason"] for s in ds.summary()["skipped_files"]}
    assert "0 bytes" in skipped[str(folder / "b.jpg")] and "truncated" in skipped[str(folder / "3_more" / "c.png")]


def test_strict_stops_naming_every_broken_image_before_any_encoding(folder, tmp_path):
    _damage(folder)
    codec, enc = PoolCodec(), SpyEncoder()
    cfg = dataclasses.replace(_cfg(folder), strict=True)
    with pytest.raises(ImageError, match=r"(?s)2 image\(s\).*data.strict is on.*b\.jpg: the file is empty.*"
                                         r"c\.png: image file is truncated"):
        _prepare(cfg, tmp_path, codec, enc)
    assert codec.calls == [] and enc.calls == []


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_no_readable_image_stops_before_any_encoding(tmp_path, damage):
    root = tmp_path / "bad"
    _img(root / "b.png", 64, 64, 0)
    data = (root / "b.png").read_bytes()
    (root / "b.png").write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    codec, enc = PoolCodec(), SpyEncoder()
    with pytest.raises(ImageError, match=r"no usable image in .*bad: all 1 image\(s\) cannot be read:\n.*b\.png"):
        _prepare(_cfg(root), tmp_path, codec, enc)
    assert codec.calls == [] and enc.calls == []


def test_banner_cropped_to_less_than_half_is_named(folder, tmp_path, caplog):
    _img(folder / "banner.png", 1000, 40, 6)  # 25:1; min_side=32 forces a 128x32 bucket: 84% cropped away
    (folder / "banner.txt").write_text("a long banner")
    with caplog.at_level(logging.WARNING):
        ds, _, _ = _prepare(_cfg(folder), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "lose more than half" in r.getMessage()]
    assert len(warnings) == 1 and str(folder / "banner.png") in warnings[0]
    assert not any(n in warnings[0] for n in ("a.png", "b.jpg", "c.png", "d.webp"))
    assert [h.split(" ")[0] for h in ds.summary()["heavy_crops"]] == [str(folder / "banner.png")]


class ShortEncoder(SpyEncoder):
    """A spy encoder that reads at most 4 words (like a token limit)."""

    def overlong(self, texts):
        return {t: f"keeps 4 of its {len(t.split())} words" for t in texts if len(t.split()) > 4}


def test_captions_cut_by_the_token_limit_name_their_files(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _prepare(_cfg(folder), tmp_path, enc=ShortEncoder())
    warnings = [r.getMessage() for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{folder / 'b.txt'}: keeps 4 of its 5 words" in warnings[0]  # "sks on a chair, indoor"
    assert str(folder / "a.txt") in warnings[0] and "c.txt" not in warnings[0]


def test_batches_are_deterministic_single_bucket_and_cover_the_epoch(folder, tmp_path):
    ds, _, _ = _prepare(_cfg(folder, shuffle=True, shuffle_variants=4, caption_dropout=0.2), tmp_path)
    n = ds.batches_per_epoch
    seen = []
    for index in range(n):
        b1 = ds.batch(index, torch.Generator().manual_seed(100 + index))
        b2 = ds.batch(index, torch.Generator().manual_seed(100 + index))
        assert torch.equal(b1.latents, b2.latents) and b1.captions == b2.captions and b1.sources == b2.sources
        assert torch.equal(b1.text.context, b2.text.context)
        assert b1.latents.shape[0] <= ds.batch_size == 2
        assert b1.extras["class_text"].context.shape[0] == b1.latents.shape[0]
        seen.extend(ds.epoch_plan(0)[index])
    assert sorted(seen) == sorted(i for i, e in enumerate(ds.entries) for _ in range(e.repeats))
    assert all(len({ds.entries[i].bucket for i in ids}) == 1 for ids in ds.epoch_plan(0))
    assert ds.epoch_plan(0) != ds.epoch_plan(1)
    assert ds.batch(n, torch.Generator().manual_seed(0)).sources == [str(ds.entries[i].source) for i in ds.epoch_plan(1)[0]]
    # a fresh dataset with the same seed replays the same order
    again, _, _ = _prepare(_cfg(folder, shuffle=True, shuffle_variants=4, caption_dropout=0.2), tmp_path)
    assert again.epoch_plan(3) == ds.epoch_plan(3)


def test_extras_align_with_captions(folder, tmp_path):
    enc = SpyEncoder()
    ds, _, _ = _prepare(_cfg(folder, caption_dropout=0.5), tmp_path, enc=enc)
    reference = SpyEncoder()
    for index in range(ds.batches_per_epoch):
        b = ds.batch(index, torch.Generator().manual_seed(index))
        for i, caption in enumerate(b.captions):
            want = "toy" if caption == "" else caption.replace("sks", "toy")
            ctx = reference.encode([want])[0].context
            assert torch.equal(b.extras["class_text"].context[i, : ctx.shape[0]], ctx)
            main = reference.encode([caption])[0].context
            assert torch.equal(b.text.context[i, : main.shape[0]], main)


def test_no_usable_image_is_an_error_and_progress_is_reported(tmp_path):
    root = tmp_path / "small"
    _img(root / "x.png", 20, 20, 0)
    with pytest.raises(ValueError, match=r"small.*min_side"):
        _prepare(_cfg(root), tmp_path)
    _img(root / "y.png", 64, 64, 1)
    calls = []
    _prepare(_cfg(root), tmp_path, progress=lambda done, total, what: calls.append((done, total, what)))
    assert (1, 1, "encoding images") in calls and calls[-1][0] == calls[-1][1]


def test_latent_is_the_encoded_bucket_crop(folder, tmp_path):
    from trainer_core.data.buckets import resize_and_crop
    from trainer_core.data.images import image_to_tensor, load_image

    ds, _, _ = _prepare(_cfg(folder), tmp_path)
    for e in ds.entries:
        img, _ = resize_and_crop(load_image(e.source), e.bucket)
        want = PoolCodec().encode(image_to_tensor(img)[None])[0]
        tol = 0.05 if e.source.suffix == ".jpg" else 1e-5  # JPEG may be decoded at a reduced DCT scale
        assert torch.allclose(e.latent, want, atol=tol), e.source


def test_warnings_name_every_file_not_the_first_few(tmp_path, caplog):
    root = tmp_path / "many"
    for i in range(30):
        _img(root / f"img{i:02d}.png", 32, 32, i)  # no captions
    with caplog.at_level(logging.WARNING):
        _prepare(_cfg(root), tmp_path)
    message = next(r.getMessage() for r in caplog.records if "no caption file" in r.getMessage())
    assert all(str(root / f"img{i:02d}.png") in message for i in range(30)) and "more" not in message


def test_dataset_change_warning_names_every_change(tmp_path, caplog):
    from trainer_core.control import DatasetWatchCallback, folder_snapshot

    before = folder_snapshot(tmp_path)
    for i in range(30):
        (tmp_path / f"new{i:02d}.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        DatasetWatchCallback(tmp_path, before).on_train_end(None, "finished")
    assert all(f"added new{i:02d}.txt" in caplog.text for i in range(30)) and "more" not in caplog.text
