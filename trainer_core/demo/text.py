"""A weight-free, deterministic word-level text encoder for the embedded demo.

Each word gets an embedding drawn from a ``torch.Generator`` seeded by a stable hash of
the word (SHA-256, so the same on every machine and Python run, unlike ``hash()``), plus a
small fixed sinusoidal positional term. Captions that differ in one word therefore differ
in exactly one context token: ``"a photo of sks"`` is ``"a photo of"`` plus one token.
"""
from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache

import torch

from ..types import TextEmbedding

_WORD = re.compile(r"[^0-9a-z]+")
POSITION_AMPLITUDE = 0.1  # keeps word identity dominant over position


def words(text: str) -> list[str]:
    """Lowercase and split on runs of non-alphanumerics; empty pieces dropped."""
    return [w for w in _WORD.split(text.lower()) if w]


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % (2**63 - 1)


@lru_cache(maxsize=4096)
def word_vector(word: str, width: int) -> torch.Tensor:
    """Unit-variance embedding ``[width]`` of one word, a pure function of (word, width)."""
    g = torch.Generator().manual_seed(_seed(f"word:{word}"))
    return torch.randn(width, generator=g)


def positional(count: int, width: int) -> torch.Tensor:
    """Sinusoidal positions ``[count, width]`` (Vaswani et al. 2017, §3.5) × ``POSITION_AMPLITUDE``."""
    pos = torch.arange(count, dtype=torch.float32)[:, None]
    i = torch.arange(width, dtype=torch.float32)[None, :]
    angle = pos / torch.pow(10000.0, (2 * (i // 2)) / width)
    table = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    return POSITION_AMPLITUDE * table


class HashTextEncoder:
    """``TextEncoder``: caption → context ``[T, width]`` and pooled ``[pooled_width]``.

    T = number of words, at least 1 and at most ``max_tokens`` (extra words are dropped).
    pooled = mean of the word vectors (no positions) @ P, a fixed ``[width, pooled_width]``
    matrix scaled by 1/√width. An empty caption is one all-zero token with zero pooled.
    """

    def __init__(self, width: int = 64, pooled_width: int = 16, max_tokens: int = 16):
        if width < 2 or pooled_width < 1 or max_tokens < 1:
            raise ValueError(
                f"HashTextEncoder needs width >= 2, pooled_width >= 1, max_tokens >= 1; "
                f"got {width}, {pooled_width}, {max_tokens}"
            )
        self.width = width
        self.pooled_width = pooled_width
        self.max_tokens = max_tokens
        self.identity = f"hash-text-v1-{width}"
        if (pooled_width, max_tokens) != (16, 16):
            self.identity += f"-p{pooled_width}-t{max_tokens}"
        g = torch.Generator().manual_seed(_seed(f"pooled-projection:{width}:{pooled_width}"))
        self._projection = torch.randn(width, pooled_width, generator=g) / math.sqrt(width)

    def overlong(self, texts: list[str]) -> dict[str, str]:
        """text → what is cut off, for each text with more than ``max_tokens`` words."""
        return {t: f"keeps {self.max_tokens} of its {len(words(t))} words" for t in texts
                if len(words(t)) > self.max_tokens}

    def encode_one(self, text: str) -> TextEmbedding:
        tokens = words(text)[: self.max_tokens]
        if not tokens:
            return TextEmbedding(torch.zeros(1, self.width), torch.zeros(self.pooled_width))
        vectors = torch.stack([word_vector(w, self.width) for w in tokens])
        context = vectors + positional(len(tokens), self.width)
        pooled = vectors.mean(0) @ self._projection
        return TextEmbedding(context, pooled)

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        return [self.encode_one(t) for t in texts]

    def release(self) -> None:
        """Nothing to free; present so callers can treat all encoders alike."""
