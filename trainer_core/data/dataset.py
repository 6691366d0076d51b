"""From a folder of images to an in-memory dataset of cached latents and embeddings.

``prepare_dataset`` does all the encoding up front (through the on-disk caches), so the
VAE and text encoder can be freed before training. ``CachedDataset.batch(index, g)`` is
then a pure function of (seed, index, g): the data order of an epoch comes from its own
generator seeded by (seed, epoch); caption variant, dropout and augmentation come from
``g``, the step generator.

Augmentation (``augment.py``): a flip-enabled dataset caches a second, mirrored latent per
image (unless its caption opts out) and ``batch`` picks one; random crop or colour jitter
switch to *live* encoding: the un-augmented latents are still cached (for validation),
but every batch is re-encoded from augmented pixels, so the codec must stay loaded
(``dataset.needs_codec``; the caller must not free it).

Edit data (``data.control_images``, ``pairs.py``): each entry also holds the latents of its
reference images, cover-cropped into the *target's* bucket (so a batch stacks them, and a
reference is encoded and cached per bucket like a target, keyed by its own content); a
flipped sample mirrors its references too. Batches group entries by bucket and number of
references; ``Batch.references`` carries them.

One *entry* is one image at one resolution (an image large enough for three
resolutions gives three entries, like ai-toolkit's per-resolution datasets); an epoch
visits every entry ``repeats`` times.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..config import BucketConfig, ConfigError, DataConfig
from ..types import Batch, LatentCodec, TextBatch, TextEmbedding, TextEncoder
from .buckets import choose_bucket, cover_crop_box, resize_and_crop, resolutions_for
from ..finite import all_finite
from .cache import EncoderOutputError, LatentCache, LatentJob, TextCache
from .augment import Augmenter, flip_allowed, needs_live_encoding
from .captions import CaptionPolicy, dropout_probability
from .notices import text_sources, warn_heavy_crops, warn_overlong
from .images import image_to_tensor, load_image
from .scan import ImageRecord, listing, scan
from .survey import probe, settle, undecodable
from .references import reference_jobs, reference_plan, stack_references, undecodable_references

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None] | None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (sha256, so nearby inputs give unrelated seeds)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True, eq=False)
class Entry:
    """One image at one bucket: ``latent`` [C, h, w], its caption variants (keys into the
    dataset's embeddings), the source file and how often an epoch visits it. ``flipped``:
    the mirrored image's latent (cached flip), ``flip_ok``: whether it may be flipped,
    ``size``: the upright source size (live encoding re-crops from it); ``references`` /
    ``flipped_references``: latents [C, h, w] of the reference images (edit data)."""

    latent: torch.Tensor
    bucket: tuple[int, int]
    texts: tuple[str, ...]
    source: Path
    repeats: int
    flipped: torch.Tensor | None = None
    flip_ok: bool = False
    size: tuple[int, int] = (0, 0)
    references: tuple[torch.Tensor, ...] = ()
    flipped_references: tuple[torch.Tensor, ...] = ()

    @property
    def group(self) -> tuple[tuple[int, int], int]:
        """What samples of one batch share: bucket and number of references."""
        return self.bucket, len(self.references)


@dataclass(frozen=True)
class _Planned:
    record: ImageRecord
    size: tuple[int, int]
    bucket: tuple[int, int]
    key: str
    flip_key: str | None = None
    refs: tuple[tuple[Path, tuple[int, int], str, str | None], ...] = ()  # (file, size, key, flip key)


def check_bucket_step(buckets: BucketConfig, pixel_multiple: int) -> None:
    if pixel_multiple < 1 or buckets.step % pixel_multiple:
        fix = math.lcm(buckets.step, max(1, pixel_multiple))
        raise ConfigError(
            f"data.buckets.step={buckets.step} must be a multiple of {pixel_multiple} for this model "
            f"(its latents are packed in {pixel_multiple}-pixel patches); use e.g. {fix}"
        )


def _pixels(path: Path, size: tuple[int, int], bucket: tuple[int, int], flip: bool = False) -> torch.Tensor:
    cover, _ = cover_crop_box(size, bucket)
    img, _ = resize_and_crop(load_image(path, min_size=cover), bucket)
    x = image_to_tensor(img)
    return x.flip(-1) if flip else x


def _plan(records, sizes, buckets: BucketConfig, codec_identity: str, flips: set[Path] = frozenset(),
          ref_sizes: Mapping[Path, tuple[int, int]] | None = None):
    planned, skipped = [], []
    for rec, size in zip(records, sizes):
        for res in resolutions_for(*size, buckets.resolutions, buckets.allow_upscale):
            bucket = choose_bucket(*size, res, buckets.step, buckets.min_side, buckets.max_side, buckets.allow_upscale)
            if bucket is None:
                skipped.append({"file": str(rec.path), "resolution": res,
                                "reason": f"{size[0]}x{size[1]} is smaller than buckets.min_side={buckets.min_side}"})
                continue
            _, box = cover_crop_box(size, bucket)
            key = LatentCache.key(rec.content_hash, bucket, box, codec_identity, flip=False)
            flip_key = LatentCache.key(rec.content_hash, bucket, box, codec_identity, flip=True) if rec.path in flips else None
            refs = reference_plan(rec, ref_sizes or {}, bucket, codec_identity, rec.path in flips)
            planned.append(_Planned(rec, size, bucket, key, flip_key, refs))
    return planned, skipped


def _drop_undecodable(planned: list[_Planned], latent_cache: LatentCache, unreadable: list[tuple[str, str]],
                      root: str, strict: bool) -> list[_Planned]:
    """Decode-check the images whose latents are not cached, then settle every unreadable
    file at once (skip + one warning, or stop); returns ``planned`` without them."""
    misses = [p.record.path for p in planned if not latent_cache.path(p.key).is_file()
              or (p.flip_key is not None and not latent_cache.path(p.flip_key).is_file())]
    bad_refs = undecodable_references(planned, latent_cache)
    unreadable += undecodable(misses) + bad_refs
    bad = {f for f, _ in unreadable}
    kept = [p for p in planned if str(p.record.path) not in bad and not any(str(r[0]) in bad for r in p.refs)]
    settle(root, unreadable, strict=strict, usable=len({p.record.path for p in kept}))
    return kept


def prepare_dataset(
    cfg: DataConfig,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    *,
    cache_dir: Path,
    pixel_multiple: int,
    seed: int,
    extra_captions: Mapping[str, Callable[[str], str]] | None = None,
    prompts: Sequence[str] = (),
    progress: Progress = None,
    latent_batch_size: int = 4,
    text_batch_size: int = 16,
) -> CachedDataset:
    """Scan, bucket, encode (through the caches) and return a ``CachedDataset``.

    Order of work: scan → read every header → choose buckets → decode-check the images
    whose latents are not cached → skip every unreadable image with one warning (or stop:
    ``data.strict``, or none usable; ``survey.settle``) → encode latents → caption
    variants → encode every distinct text once: the variants, ``""`` when caption_dropout
    > 0, for each ``extra_captions`` name the transformed variants plus the transform of a
    missing caption (used when a caption is dropped), and the ``prompts`` (preview prompts,
    negatives: ``dataset.embeddings`` serves them after the encoder is freed).
    ``progress(n, total, phase)`` reports both encoding phases (``cache.Progress``).
    """
    extra_captions = dict(extra_captions or {})
    check_bucket_step(cfg.buckets, pixel_multiple)
    found = probe(scan(cfg.path, cfg.captions.caption_extension, cfg.control_images))
    found.scan.log_warnings()
    if not found.records:
        settle(cfg.path, found.unreadable, strict=cfg.strict, usable=0)
    records, sizes = found.records, found.sizes
    policy = CaptionPolicy(cfg.captions)
    aug = cfg.augment
    live = needs_live_encoding(aug)
    flip_ok = {r.path for r in records if aug.flip and flip_allowed(policy.base_caption(r.caption), aug.flip_opt_out_words)}
    planned, skipped = _plan(records, sizes, cfg.buckets, codec.identity, set() if live else flip_ok,
                             found.reference_sizes)
    latent_cache = LatentCache(cache_dir)
    if planned:
        planned = _drop_undecodable(planned, latent_cache, found.unreadable, cfg.path, cfg.strict)
    else:  # every readable image is too small: say which files are broken, then that
        settle(cfg.path, found.unreadable, strict=cfg.strict, usable=len(records))
    used = {p.record.path for p in planned}
    missing = [str(r.path) for r in records if r.caption is None and r.path in used]
    if missing:
        log.warning("%d image(s) have no caption file (%s); they train on %r alone:%s", len(missing),
                    cfg.captions.caption_extension, CaptionPolicy(cfg.captions).base_caption(None), listing(missing))
    if skipped:
        log.warning("skipping %d image/resolution pair(s) too small for a bucket (set buckets.allow_upscale "
                    "or lower buckets.min_side to keep them):%s",
                    len(skipped), listing(f"{s['file']} @ {s['resolution']}: {s['reason']}" for s in skipped))
    if not planned:
        raise ValueError(
            f"no image in {cfg.path} fits any bucket (resolutions {cfg.buckets.resolutions}, "
            f"min_side {cfg.buckets.min_side}); add larger images, lower buckets.min_side or enable buckets.allow_upscale"
        )

    heavy = warn_heavy_crops(planned)
    variants = {r.path: _variants(policy, r.caption, seed) for r in records if r.path in used}
    overlong = warn_overlong(text_encoder, variants, {r.path: r.caption_path for r in records})
    jobs = [LatentJob(p.key, p.bucket, partial(_pixels, p.record.path, p.size, p.bucket), str(p.record.path))
            for p in planned]
    jobs += [LatentJob(p.flip_key, p.bucket, partial(_pixels, p.record.path, p.size, p.bucket, True),
                       f"{p.record.path} (mirrored)") for p in planned if p.flip_key is not None]
    jobs += reference_jobs(planned)
    latents = latent_cache.get_or_encode(jobs, codec, batch_size=latent_batch_size, progress=progress)

    texts, extras = _texts_to_encode(variants, policy, cfg.captions.caption_dropout > 0, extra_captions)
    prompts = [t for t in dict.fromkeys(prompts) if t not in texts]
    text_cache = TextCache(cache_dir)
    embeddings = text_cache.get_or_encode(texts + prompts, text_encoder, batch_size=text_batch_size,
                                          progress=progress, what=f"texts (captions and {len(prompts)} prompt(s))",
                                          sources=text_sources(records, variants, extras, cfg.captions.caption_extension))
    prompt_hits = sum(t in text_cache.cached for t in prompts)
    if text_cache.cached:
        log.info("text encodes saved by the cache: %d (%d caption texts, %d prompts)", len(text_cache.cached),
                 len(text_cache.cached) - prompt_hits, prompt_hits)

    entries = [Entry(latents[p.key], p.bucket, variants[p.record.path], p.record.path, p.record.repeats,
                     flipped=latents.get(p.flip_key), flip_ok=p.record.path in flip_ok, size=p.size,
                     references=tuple(latents[r[2]] for r in p.refs),
                     flipped_references=tuple(latents[r[3]] for r in p.refs if r[3] is not None)) for p in planned]
    if live:
        log.warning("data.augment random_crop/color_jitter: training latents cannot be cached, every batch is "
                    "encoded from augmented pixels (slower; the image encoder stays loaded)")
    summary = {
        "images": len(used),
        "captions_found": sum(r.caption is not None for r in records if r.path in used),
        "missing_captions": missing,
        "repeats": dict(sorted(_count(r.repeats for r in records if r.path in used).items())),
        "buckets": dict(sorted(_count(f"{e.bucket[0]}x{e.bucket[1]}" for e in entries).items())),
        "skipped": skipped,
        "skipped_files": found.skipped_files(),
        "heavy_crops": heavy,
        "caption_fallbacks": found.scan.caption_fallbacks,
        "overlong_captions": overlong,
        "texts": len(texts),
        "prompts": len(prompts),
        "augment": {"flip_images": len(flip_ok & used), "live_encoding": live},
        "references": dict(sorted(_count(len(r.references) for r in records if r.path in used).items())),
        "cache": {"latent_hits": latent_cache.hits, "latent_misses": latent_cache.misses,
                  "text_hits": text_cache.hits, "text_misses": text_cache.misses, "prompt_hits": prompt_hits},
    }
    return CachedDataset(entries, embeddings, batch_size=cfg.batch_size, seed=seed,
                         caption_dropout=cfg.captions.caption_dropout, extras=extras,
                         dropped_base=policy.base_caption(None), summary=summary,
                         caption_dropout_warmup=cfg.captions.caption_dropout_warmup_steps, flip=aug.flip,
                         augmenter=Augmenter(aug) if live else None, codec=codec if live else None)


def _variants(policy: CaptionPolicy, raw: str | None, seed: int) -> tuple[str, ...]:
    base = policy.base_caption(raw)
    # Seeded by the caption itself: editing one caption leaves the others' variants alone.
    return tuple(policy.variants(base, torch.Generator().manual_seed(derive_seed(seed, base))))


def _texts_to_encode(variants: dict[Path, tuple[str, ...]], policy: CaptionPolicy, dropout: bool,
                     extra_captions: Mapping[str, Callable[[str], str]]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Every distinct text training can ask for, and per extra name the table
    main text → extra text (including the missing-caption text used for dropped captions)."""
    mains = list(dict.fromkeys(v for vs in variants.values() for v in vs))
    sources = mains + ([policy.base_caption(None)] if dropout else [])
    extras = {name: {t: fn(t) for t in sources} for name, fn in extra_captions.items()}
    texts = mains + ([""] if dropout else []) + [t for table in extras.values() for t in table.values()]
    return list(dict.fromkeys(texts)), extras


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


class CachedDataset:
    """Entries plus the embeddings of every text they can use; no encoder needed.

    ``len(ds)``: samples per epoch (sum of repeats over entries). ``batch(index, g, step=)``:
    micro-batch ``index`` of optimizer step ``step``; see the module docstring. A dropped
    caption (probability ``captions.dropout_probability(caption_dropout,
    caption_dropout_warmup, step)``, drawn from ``g``) trains on the embedding of ``""``; its extras
    (e.g. ``class_text``) use the transform of a *missing* caption, i.e. of the bare
    trigger word, which the class-word transform turns into the class word alone
    (ai-toolkit's DOP does the same).
    """

    def __init__(self, entries: list[Entry], embeddings: dict[str, TextEmbedding], *, batch_size: int,
                 seed: int, caption_dropout: float, extras: dict[str, dict[str, str]],
                 dropped_base: str, summary: dict, caption_dropout_warmup: int = 0, flip: bool = False,
                 augmenter: Augmenter | None = None, codec: LatentCodec | None = None):
        if (augmenter is None) != (codec is None):
            raise ValueError("CachedDataset: live augmentation needs both an augmenter and a codec")
        if not entries:
            raise ValueError("CachedDataset needs at least one entry")
        self.entries = entries
        self.embeddings = embeddings
        self.batch_size = batch_size
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.extras = extras
        self.dropped_base = dropped_base
        self._summary = summary
        self.caption_dropout_warmup = caption_dropout_warmup
        self.flip = flip
        self.augmenter, self.codec = augmenter, codec
        per_bucket = _count(e.group for e in entries for _ in range(e.repeats))
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in per_bucket.values())
        self._plan_cache: tuple[int, list[list[int]]] = (-1, [])

    def subset(self, keep: Callable[[Entry], bool]) -> "CachedDataset":
        """The same dataset over the entries ``keep`` accepts (e.g. without held-out images)."""
        entries = [e for e in self.entries if keep(e)]
        out = CachedDataset.__new__(CachedDataset)
        out.__dict__.update(self.__dict__)
        CachedDataset.__init__(out, entries, self.embeddings, batch_size=self.batch_size, seed=self.seed,
                               caption_dropout=self.caption_dropout, extras=self.extras,
                               dropped_base=self.dropped_base, caption_dropout_warmup=self.caption_dropout_warmup,
                               flip=self.flip, augmenter=self.augmenter, codec=self.codec,
                               summary=dict(self._summary, images=len({e.source for e in entries}),
                                            buckets=dict(sorted(_count(f"{e.bucket[0]}x{e.bucket[1]}"
                                                                       for e in entries).items()))))
        return out

    @property
    def needs_codec(self) -> bool:
        """True when batches are encoded live (random crop / colour jitter): keep the codec."""
        return self.codec is not None

    def __len__(self) -> int:
        return sum(e.repeats for e in self.entries)

    def summary(self) -> dict:
        return dict(self._summary, samples_per_epoch=len(self), batches_per_epoch=self.batches_per_epoch)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as lists of entry indices, each list from one bucket.

        Samples (entry × repeats) are permuted by a generator seeded from (seed, epoch),
        grouped by bucket in that order, cut into ``batch_size`` chunks (a bucket's last
        chunk may be smaller) and the chunks permuted again, so buckets interleave.
        """
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        g = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
        samples = [i for i, e in enumerate(self.entries) for _ in range(e.repeats)]
        by_bucket: dict[tuple, list[int]] = {}
        for j in torch.randperm(len(samples), generator=g).tolist():
            by_bucket.setdefault(self.entries[samples[j]].group, []).append(samples[j])
        chunks = [ids[i : i + self.batch_size] for b in sorted(by_bucket) for ids in [by_bucket[b]]
                  for i in range(0, len(ids), self.batch_size)]
        plan = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        self._plan_cache = (epoch, plan)
        return plan

    def batch(self, index: int, generator: torch.Generator, step: int | None = None) -> Batch:
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        epoch, pos = divmod(index, self.batches_per_epoch)
        ids = self.epoch_plan(epoch)[pos]
        texts, extra_texts, flips = [], {name: [] for name in self.extras}, []
        p_drop = dropout_probability(self.caption_dropout, self.caption_dropout_warmup, step)
        for i in ids:
            entry = self.entries[i]
            # Always draw every number so the generator advances the same way every step.
            pick = int(torch.randint(len(entry.texts), (1,), generator=generator))
            dropped = bool(torch.rand((), generator=generator) < p_drop)
            coin = self.flip and bool(torch.rand((), generator=generator) < 0.5)  # drawn only with flip on
            flips.append(coin and entry.flip_ok)
            text = "" if dropped else entry.texts[pick]
            texts.append(text)
            for name, table in self.extras.items():
                extra_texts[name].append(table[self.dropped_base if dropped else text])
        return Batch(
            latents=self._latents(ids, flips, generator),
            text=TextBatch.collate([self.embeddings[t] for t in texts]),
            captions=texts,
            sources=[str(self.entries[i].source) for i in ids],
            extras={name: TextBatch.collate([self.embeddings[t] for t in ts]) for name, ts in extra_texts.items()},
            references=stack_references([self.entries[i] for i in ids], flips),
        )

    def _latents(self, ids: list[int], flips: list[bool], generator: torch.Generator) -> torch.Tensor:
        """[B, C, h, w]: cached (the mirrored latent where flipped), or encoded now from
        augmented pixels (draws from ``generator`` per sample, in order)."""
        if self.codec is None:
            return torch.stack([e.flipped if f else e.latent for e, f in zip((self.entries[i] for i in ids), flips)])
        pixels = torch.stack([self.augmenter.pixels(self.entries[i].source, self.entries[i].size,
                                                    self.entries[i].bucket, f, generator) for i, f in zip(ids, flips)])
        with torch.no_grad():
            latents = self.codec.encode(pixels).detach().cpu()
        if not all_finite(latents):
            raise EncoderOutputError(
                f"the image encoder {self.codec.identity!r} returned NaN/inf for the augmented "
                f"{', '.join(str(self.entries[i].source) for i in ids)}; its weights are likely broken (or it "
                "overflows in fp16); this is not a learning-rate problem")
        return latents
