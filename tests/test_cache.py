"""Latent and text caches: keys, hits/misses, batching, corruption, atomic files."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from trainer_core.data.cache import LatentCache, LatentJob, TextCache
from trainer_core.types import TextEmbedding


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


def _job(key, bucket, value):
    return LatentJob(key, bucket, lambda: torch.full((3, bucket[1], bucket[0]), value))


def test_latent_key_depends_on_every_input():
    base = ("ab" * 32, (64, 32), (0, 4, 64, 36), "vae-a", False)
    keys = {LatentCache.key(*base)}
    for i, other in enumerate(["cd" * 32, (32, 64), (1, 4, 65, 36), "vae-b", True]):
        changed = list(base)
        changed[i] = other
        keys.add(LatentCache.key(*changed))
    assert len(keys) == 6
    assert LatentCache.key(*base) == LatentCache.key(*base)


def test_latent_get_or_encode_batches_misses_by_bucket_then_hits(tmp_path):
    cache, codec = LatentCache(tmp_path), PoolCodec()
    jobs = [_job(f"k{i}", (32, 16) if i < 5 else (16, 32), i / 10) for i in range(7)]
    jobs.append(jobs[0])  # duplicate key: encoded once
    checked = []
    out = cache.get_or_encode(jobs, codec, batch_size=2, check=lambda misses: checked.extend(m.key for m in misses))
    assert sorted(checked) == [f"k{i}" for i in range(7)]
    assert sorted(codec.calls) == sorted([(2, 3, 16, 32)] * 2 + [(1, 3, 16, 32), (2, 3, 32, 16)])
    assert out["k6"].shape == (4, 4, 2) and torch.allclose(out["k3"], torch.full((4, 2, 4), 0.3))
    again = LatentCache(tmp_path)
    out2 = again.get_or_encode(jobs, codec, check=lambda m: checked.append("again"))
    assert len(codec.calls) == 4 and "again" not in checked
    assert again.hits == 7 and again.misses == 0
    assert all(torch.equal(out[k], out2[k]) for k in out)
    assert not list((tmp_path / "latents").glob("*.tmp"))


def test_corrupt_latent_file_is_a_warned_miss_and_rewritten(tmp_path, caplog):
    cache, codec = LatentCache(tmp_path), PoolCodec()
    cache.get_or_encode([_job("k", (16, 16), 0.5)], codec)
    cache.path("k").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        out = cache.get_or_encode([_job("k", (16, 16), 0.5)], codec)
    assert len(codec.calls) == 2 and "unreadable" in caplog.text and str(cache.path("k")) in caplog.text
    assert torch.allclose(LatentCache(tmp_path).load("k"), out["k"])


def test_text_cache_hits_misses_and_batching(tmp_path):
    enc = SpyEncoder()
    cache = TextCache(tmp_path)
    texts = ["a", "b c", "a", "", "d", "e"]
    out = cache.get_or_encode(texts, enc, batch_size=2)
    assert enc.calls == [["a", "b c"], ["", "d"], ["e"]]
    assert out["b c"].context.shape == (3, 8) and out["b c"].pooled.shape == (4,)
    out2 = TextCache(tmp_path).get_or_encode(texts + ["new"], enc, batch_size=2)
    assert enc.calls[3:] == [["new"]]
    assert torch.equal(out2["b c"].context, out["b c"].context) and torch.equal(out2["e"].pooled, out["e"].pooled)


def test_text_key_uses_text_and_encoder_identity(tmp_path):
    assert TextCache.key("a", "enc1") != TextCache.key("a ", "enc1")
    assert TextCache.key("a", "enc1") != TextCache.key("a", "enc2")
    enc = SpyEncoder(pooled=False)
    out = TextCache(tmp_path).get_or_encode(["x"], enc)
    assert out["x"].pooled is None and TextCache(tmp_path).load(TextCache.key("x", enc.identity)).pooled is None
    other = SpyEncoder()
    other.identity = "another-encoder"
    TextCache(tmp_path).get_or_encode(["x"], other)
    assert other.calls == [["x"]]
