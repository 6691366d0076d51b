"""Caption processing as two short pipelines of small pure stages.

* base stages ``(caption) -> caption`` run once per image: strip, fill a missing caption,
  make sure the trigger word is present;
* variant stages ``(caption, generator) -> caption`` are random: ``variants`` runs them
  repeatedly and keeps the distinct results, which are all pre-encoded so the text
  encoder can be freed before training. In order: wildcards ``{a|b|c}`` (one choice per
  group), tag dropout (each tag after the kept ones dropped with probability p) and tag
  shuffling (kohya's ``keep_tokens``: the first tags stay put).

Caption dropout (the empty caption for a whole step) happens later, per step, in the
dataset; ``dropout_probability`` ramps it in linearly.

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


_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def expand_wildcards(caption: str, generator: torch.Generator) -> str:
    """Replace every ``{a|b|c}`` group by one of its options, each drawn uniformly (left
    to right, one ``randint`` per group). Braces without a ``|`` are left as they are."""
    if "{" not in caption:
        return caption

    def choose(m: re.Match) -> str:
        options = m.group(1).split("|")
        return options[int(torch.randint(len(options), (1,), generator=generator))].strip()

    return _WILDCARD.sub(choose, caption)


def drop_tags(caption: str, generator: torch.Generator, *, keep: int, separator: str, p: float) -> str:
    """Drop each tag after the first ``keep`` independently with probability ``p``
    (one ``rand`` per such tag)."""
    tags = split_tags(caption, separator)
    head, tail = tags[:keep], tags[keep:]
    if not tail:
        return caption
    draws = torch.rand(len(tail), generator=generator).tolist()
    return join_tags(head + [t for t, u in zip(tail, draws) if u >= p], separator)


def dropout_probability(p: float, warmup_steps: int, step: int | None) -> float:
    """Caption dropout at optimizer step ``step`` (0-based): ``p·min(1, step/warmup_steps)``,
    i.e. 0 at the first step and ``p`` from step ``warmup_steps`` on; ``p`` when there is no
    warmup or the step is unknown (``None``)."""
    if warmup_steps <= 0 or step is None:
        return p
    return p * min(1.0, max(0, step) / warmup_steps)


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
        if cfg.wildcards:
            self.variant_stages.append(expand_wildcards)
        if cfg.tag_dropout > 0:
            self.variant_stages.append(partial(drop_tags, keep=cfg.keep_tokens, separator=cfg.separator,
                                               p=cfg.tag_dropout))
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
