"""Caption processing as two short pipelines of small pure stages.

* base stages ``(caption) -> caption`` run once per image: strip, fill a missing caption,
  make sure the trigger word is present;
* variant stages ``(caption, generator) -> caption`` are random: ``variants`` runs them
  repeatedly and keeps the distinct results, which are all pre-encoded so the text
  encoder can be freed before training. Today the only variant stage is tag shuffling
  (kohya's ``keep_tokens``: the first tags stay put); wildcards ``{a|b}`` and tag dropout
  slot in as further variant stages.

Trigger matching is case-sensitive and whole-word: the trigger must not touch another
word character on either side (``(?<!\\w)trigger(?!\\w)``, i.e. ``\\b`` for ordinary
words, but also correct for triggers such as ``<sks>``), so ``sks`` never matches
inside ``sksx``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch

from ..config import CaptionConfig

BaseStage = Callable[[str], str]
VariantStage = Callable[[str, torch.Generator], str]


def word_pattern(word: str) -> re.Pattern:
    """Regex matching ``word`` as a whole word (not inside a longer word)."""
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")


def split_tags(caption: str, separator: str) -> list[str]:
    """Separator-split, stripped, non-empty tags."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: list[str], separator: str) -> str:
    """Inverse of ``split_tags``: ``"a, b"`` for ``,``; a whitespace separator is used as is."""
    glue = separator if not separator.strip() else separator + " "
    return glue.join(tags)


def ensure_trigger(caption: str, trigger: str, separator: str) -> str:
    """Prepend ``trigger`` as its own first tag unless it already occurs as a whole word."""
    if not trigger or word_pattern(trigger).search(caption):
        return caption
    return join_tags([trigger, caption], separator) if caption else trigger


def shuffle_tags(caption: str, generator: torch.Generator, *, keep: int, separator: str) -> str:
    """Shuffle the tags after the first ``keep`` (which stay in place)."""
    tags = split_tags(caption, separator)
    head, tail = tags[:keep], tags[keep:]
    if len(tail) < 2:
        return caption
    order = torch.randperm(len(tail), generator=generator).tolist()
    return join_tags(head + [tail[i] for i in order], separator)


class CaptionPolicy:
    """What the text encoder sees for each image, from ``CaptionConfig``."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.fallback = cfg.trigger_word or cfg.class_word
        self.base_stages: list[BaseStage] = [
            str.strip,
            partial(ensure_trigger, trigger=cfg.trigger_word, separator=cfg.separator),
        ]
        self.variant_stages: list[VariantStage] = []
        if cfg.shuffle:
            self.variant_stages.append(partial(shuffle_tags, keep=cfg.keep_tokens, separator=cfg.separator))

    def base_caption(self, raw: str | None) -> str:
        """The processed caption of one image. A missing or blank caption becomes the
        trigger word alone (the class word when there is no trigger; '' with neither)."""
        if raw is None or not raw.strip():
            return self.fallback
        caption = raw
        for stage in self.base_stages:
            caption = stage(caption)
        return caption

    def variants(self, caption: str, generator: torch.Generator) -> list[str]:
        """Up to ``shuffle_variants`` distinct outcomes of the random stages, in the order
        first drawn (deterministic given ``generator``). ``[caption]`` when no stage is
        random; fewer than asked when fewer distinct outcomes exist (e.g. 3 shuffled tags
        have 6 orders)."""
        if not self.variant_stages:
            return [caption]
        wanted = self.cfg.shuffle_variants
        found: list[str] = []
        for _ in range(20 * wanted):  # enough draws to find nearly every outcome when few exist
            text = caption
            for stage in self.variant_stages:
                text = stage(text, generator)
            if text not in found:
                found.append(text)
                if len(found) == wanted:
                    break
        return found

    def replace_trigger(self, caption: str, replacement: str) -> str:
        """Whole-word replacement of the trigger (e.g. by the class word, for preservation
        losses). Leaves the caption unchanged when there is no trigger word."""
        trigger = self.cfg.trigger_word
        if not trigger:
            return caption
        return word_pattern(trigger).sub(lambda _: replacement, caption)
