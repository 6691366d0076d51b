"""The validation split: images the validation loss is measured on and training never sees.

Two ways (``ValidationConfig``):

* ``validation.path`` set: that folder is prepared like the training folder (same buckets
  and caption rules, no augmentation) and is the validation set; nothing is held out;
* otherwise ``validation.images`` source images of ``data.path`` are held out: the distinct
  image files, sorted by path, are permuted by a generator seeded from ``validation.seed``
  and the first N are removed from training (every entry of such an image, i.e. all its
  resolutions). At least one image must remain to train on.

Nothing is split when the validation loss is off (``validation.every_n_steps = 0``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import AugmentConfig, DataConfig, TrainingConfig
from .dataset import derive_seed

log = logging.getLogger(__name__)

PrepareFn = Callable[[DataConfig], Any]  # DataConfig -> CachedDataset (same codec, encoder, cache)


def held_out_sources(sources: list[Path], count: int, seed: int) -> list[Path]:
    """The ``count`` image files held out of ``sources`` (see the module docstring)."""
    distinct = sorted(set(sources), key=str)
    if count >= len(distinct):
        raise ValueError(
            f"validation.images={count} would hold out all {len(distinct)} image(s) of data.path, leaving none to "
            f"train on; lower validation.images (at most {len(distinct) - 1}) or set validation.path to a separate "
            "folder of validation images")
    g = torch.Generator().manual_seed(derive_seed("validation holdout", seed))
    order = torch.randperm(len(distinct), generator=g).tolist()
    return sorted((distinct[i] for i in order[:count]), key=str)


def split_validation(config: TrainingConfig, dataset: Any, prepare: PrepareFn) -> tuple[Any, Optional[Any]]:
    """``(training dataset, validation dataset or None)`` for this config."""
    v = config.validation
    if v.every_n_steps < 1:
        return dataset, None
    if v.path:
        val = prepare(dataclasses.replace(config.data, path=v.path, augment=AugmentConfig()))
        train_files = {Path(e.source).resolve() for e in dataset.entries}
        both = sorted({str(e.source) for e in val.entries if Path(e.source).resolve() in train_files})
        if both:
            raise ValueError(f"validation.path shares {len(both)} image file(s) with data.path (e.g. {both[0]}); "
                             "validation images must not be trained on: use a separate folder")
        log.info("validation loss on %d image(s) of %s", len({e.source for e in val.entries}), v.path)
        return dataset, val
    held = set(held_out_sources([e.source for e in dataset.entries], v.images, v.seed))
    train, val = dataset.subset(lambda e: e.source not in held), dataset.subset(lambda e: e.source in held)
    log.info("validation loss on %d image(s) held out of the training data: %s", len(held),
             ", ".join(Path(p).name for p in sorted(held, key=str)))
    return train, val
