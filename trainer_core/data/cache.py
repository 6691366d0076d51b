"""On-disk caches of encoded latents and caption embeddings (safetensors files).

Keys are sha256 digests of *everything the encoded tensor depends on*, so a cache entry
can never be stale, only unused:

* latents: image bytes (``content_hash``), bucket size, crop box, flip, codec identity;
* text: the exact string and the encoder identity (captions, and the prompts a host
  passes to ``train_lora(prompts=...)``: preview prompts, negatives; the Sampler Preview
  node keys its prompts the same way).

(ai-toolkit keys latents by file name and kohya's text cache ignores caption edits;
both go stale after an edit. Here an edited image or caption simply gets a new key.)
Writes are atomic (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written entry; an unreadable entry is reported,
treated as a miss and rewritten.

Every encoded latent and embedding must be finite: NaN/inf from the encoder (a VAE or
text encoder with missing or broken weights) stops the run before the first step with
``EncoderOutputError`` naming the image or caption and the encoder, and is never cached;
a non-finite entry already in the cache is reported, deleted and encoded again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..finite import all_finite
from ..types import LatentCodec, TextEmbedding, TextEncoder

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
# (n done, total to encode, phase name): called with n=0 before the first encode (also when
# everything is cached, total=0), then after every batch. See trainer_core.phases.
Progress = Callable[[int, int, str], None] | None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem[:16], suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: Path, required: Iterable[str]) -> dict[str, torch.Tensor] | None:
    """The file's tensors, or None when it is missing or unreadable (warned)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        log.warning("cache file %s is unreadable (%s); re-encoding it", path, e)
        return None
    missing = [k for k in required if k not in tensors]
    if missing:
        log.warning("cache file %s lacks %s; re-encoding it", path, missing)
        return None
    return tensors


class EncoderOutputError(ValueError):
    """An encoder returned NaN/inf: its weights are broken, not the training settings."""


def _finite_entry(path: Path, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``tensors``, or None (entry deleted, warned) when they hold NaN/inf."""
    if tensors is None or all_finite(tensors):
        return tensors
    log.warning("cache file %s holds NaN/inf values (written by a broken encoder); deleting it and encoding "
                "again", path)
    path.unlink(missing_ok=True)
    return None


def _broken_encoder(kind: str, identity: str, what: list[str], hint: str) -> EncoderOutputError:
    shown = "\n  ".join(what[:20]) + (f"\n  ... and {len(what) - 20} more" if len(what) > 20 else "")
    return EncoderOutputError(
        f"the {kind} {identity!r} returned NaN/inf for:\n  {shown}\nIts weights are likely broken or missing "
        f"({hint}); this is not a learning-rate problem, and nothing of it was cached. Load a working {kind} "
        "and train again.")


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True)
class LatentJob:
    """One latent to get: its cache ``key``, the ``bucket`` (images of one bucket are
    encoded together), ``pixels()`` → [3, H, W] in [-1, 1], called only on a miss, and a
    ``label`` naming the image in messages (its file)."""

    key: str
    bucket: tuple[int, int]
    pixels: Callable[[], torch.Tensor]
    label: str = ""


class LatentCache:
    """``<dir>/latents/<key>.safetensors`` holding one tensor ``latent`` [C, h, w]."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory) / "latents"
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(content_hash: str, bucket: tuple[int, int], crop_box: tuple[int, int, int, int],
            codec_identity: str, flip: bool = False) -> str:
        return _digest("latent", CACHE_FORMAT, content_hash, f"{bucket[0]}x{bucket[1]}",
                       ",".join(map(str, crop_box)), codec_identity, "flip" if flip else "noflip")

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        tensors = _finite_entry(self.path(key), _read(self.path(key), ["latent"]))
        return None if tensors is None else tensors["latent"]

    def save(self, key: str, latent: torch.Tensor, codec_identity: str) -> None:
        _write_atomic(self.path(key), {"latent": latent}, {"format": CACHE_FORMAT, "codec": codec_identity})

    def get_or_encode(self, jobs: list[LatentJob], codec: LatentCodec, *, batch_size: int = 4,
                      check: Callable[[list[LatentJob]], None] | None = None,
                      progress: Progress = None) -> dict[str, torch.Tensor]:
        """key → latent [C, h, w] for every job. Misses are encoded in batches of one
        bucket (``codec.encode`` once per batch, under ``torch.no_grad``) and written.
        ``check(misses)`` runs before the first encode, so a bad input fails early."""
        out: dict[str, torch.Tensor] = {}
        todo: dict[tuple[int, int], list[LatentJob]] = {}
        queued: set[str] = set()
        for job in jobs:
            if job.key in out or job.key in queued:
                continue
            cached = self.load(job.key)
            if cached is not None:
                out[job.key] = cached
                self.hits += 1
            else:
                todo.setdefault(job.bucket, []).append(job)
                queued.add(job.key)
        if check is not None and todo:
            check([job for bucket in sorted(todo) for job in todo[bucket]])
        total, done = sum(len(v) for v in todo.values()), 0
        log.info("images: %d latent(s) to encode, %d from the cache", total, len(out))
        if progress is not None:
            progress(0, total, "encoding images")
        for bucket in sorted(todo):
            for chunk in _chunks(todo[bucket], batch_size):
                pixels = torch.stack([job.pixels() for job in chunk])
                with torch.no_grad():
                    latents = codec.encode(pixels)
                if not all_finite(latents):
                    bad = [f"{job.label or job.key} (bucket {job.bucket[0]}x{job.bucket[1]})"
                           for job, latent in zip(chunk, latents) if not all_finite(latent)]
                    raise _broken_encoder("image encoder (VAE)", codec.identity, bad,
                                          "a wrong, incomplete or corrupt VAE file, or a VAE overflowing in fp16")
                for job, latent in zip(chunk, latents):
                    latent = latent.detach().cpu().clone()
                    self.save(job.key, latent, codec.identity)
                    out[job.key] = latent
                self.misses += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total, "encoding images")
        return out


class TextCache:
    """``<dir>/text/<key>.safetensors`` holding ``context`` [T, D] and optional ``pooled`` [P]."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory) / "text"
        self.hits = 0
        self.misses = 0
        self.cached: set[str] = set()

    @staticmethod
    def key(text: str, encoder_identity: str) -> str:
        return _digest("text", CACHE_FORMAT, encoder_identity, text)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def load(self, key: str) -> TextEmbedding | None:
        tensors = _finite_entry(self.path(key), _read(self.path(key), ["context"]))
        return None if tensors is None else TextEmbedding(tensors["context"], tensors.get("pooled"))

    def save(self, key: str, emb: TextEmbedding, encoder_identity: str) -> None:
        tensors = {"context": emb.context}
        if emb.pooled is not None:
            tensors["pooled"] = emb.pooled
        _write_atomic(self.path(key), tensors, {"format": CACHE_FORMAT, "encoder": encoder_identity})

    def get_or_encode(self, texts: Iterable[str], encoder: TextEncoder, *, batch_size: int = 16,
                      progress: Progress = None, sources: Mapping[str, str] | None = None,
                      what: str = "text(s)") -> dict[str, TextEmbedding]:
        """text → embedding for every distinct text; misses go to ``encoder.encode`` in
        batches of ``batch_size`` (one call per batch, under ``torch.no_grad``).
        ``sources`` (text → where it comes from, e.g. its caption file) words errors;
        ``self.cached`` holds the texts of this call served from the cache."""
        sources = sources or {}
        out: dict[str, TextEmbedding] = {}
        misses: list[str] = []
        for text in dict.fromkeys(texts):  # distinct, first-seen order
            cached = self.load(self.key(text, encoder.identity))
            if cached is not None:
                out[text] = cached
                self.hits += 1
            else:
                misses.append(text)
        self.cached = set(out)
        if out or misses:
            log.info("%s: %d to encode, %d from the cache", what, len(misses), len(out))
        if progress is not None:
            progress(0, len(misses), "encoding captions")
        for i, chunk in enumerate(_chunks(misses, batch_size)):
            with torch.no_grad():
                embs = encoder.encode(chunk)
            if len(embs) != len(chunk):
                raise ValueError(f"text encoder {encoder.identity!r} returned {len(embs)} embeddings for {len(chunk)} captions")
            if not all_finite([(e.context, e.pooled) for e in embs]):
                bad = [f"{text!r} ({sources.get(text, 'caption')})" for text, e in zip(chunk, embs)
                       if not all_finite((e.context, e.pooled))]
                raise _broken_encoder("text encoder", encoder.identity, bad,
                                      "a wrong, incomplete or corrupt CLIP/T5 file, or an encoder overflowing in fp16")
            for text, emb in zip(chunk, embs):
                emb = TextEmbedding(emb.context.detach().cpu().clone(),
                                    None if emb.pooled is None else emb.pooled.detach().cpu().clone())
                self.save(self.key(text, encoder.identity), emb, encoder.identity)
                out[text] = emb
            self.misses += len(chunk)
            if progress is not None:
                progress(min(len(misses), (i + 1) * batch_size), len(misses), "encoding captions")
        return out


class EmbeddingLookup:
    """A ``TextEncoder`` over embeddings already encoded (``dataset.embeddings``): serves
    them with no encoder loaded. A text not among them goes to ``fallback`` (counted in
    ``encoded``), or raises a KeyError naming it when there is none."""

    def __init__(self, embeddings: dict[str, TextEmbedding], fallback: TextEncoder | None = None):
        self.embeddings, self.fallback = embeddings, fallback
        self.identity = getattr(fallback, "identity", "cached-embeddings")
        self.encoded = 0

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.embeddings]
        if missing and self.fallback is None:
            raise KeyError(f"no cached embedding for {missing[:3]}: pass these texts as train_lora(prompts=...) "
                           "so they are encoded with the captions")
        new = dict(zip(missing, self.fallback.encode(missing))) if missing else {}
        self.encoded += len(new)
        return [self.embeddings[t] if t in self.embeddings else new[t] for t in texts]
