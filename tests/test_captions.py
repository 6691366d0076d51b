"""Caption policy: trigger handling, whole-word replacement, shuffling, dropout rate."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer_core.config import CaptionConfig
from trainer_core.data.captions import CaptionPolicy
from trainer_core.data.dataset import CachedDataset, Entry
from trainer_core.types import TextEmbedding


def test_base_caption_trigger_and_fallbacks():
    p = CaptionPolicy(CaptionConfig(trigger_word="sks", class_word="dog"))
    assert p.base_caption("a dog, on grass") == "sks, a dog, on grass"
    assert p.base_caption("  photo of sks dog ") == "photo of sks dog"  # already there
    assert p.base_caption("sksx dog") == "sks, sksx dog"  # not a whole word
    assert p.base_caption(None) == "sks" and p.base_caption("   ") == "sks"
    assert CaptionPolicy(CaptionConfig(class_word="dog")).base_caption(None) == "dog"
    assert CaptionPolicy(CaptionConfig()).base_caption("plain") == "plain"
    assert CaptionPolicy(CaptionConfig(trigger_word="sks", separator=" ")).base_caption("dog") == "sks dog"


def test_replace_trigger_whole_words_only():
    p = CaptionPolicy(CaptionConfig(trigger_word="sks", class_word="dog"))
    assert p.replace_trigger("sks, sksx, xsks, sks.", "dog") == "dog, sksx, xsks, dog."
    assert p.replace_trigger("photo of sks_1", "dog") == "photo of sks_1"
    odd = CaptionPolicy(CaptionConfig(trigger_word="<s1>"))
    assert odd.replace_trigger("a <s1> toy, <s1>x", "toy") == "a toy toy, <s1>x"  # regex chars escaped
    assert CaptionPolicy(CaptionConfig()).replace_trigger("sks dog", "x") == "sks dog"


def test_shuffle_keeps_leading_tokens_in_place():
    p = CaptionPolicy(CaptionConfig(trigger_word="sks", keep_tokens=2, shuffle=True, shuffle_variants=16))
    caption = p.base_caption("red collar, a, b, c, d, e")
    assert caption.startswith("sks, red collar, ")
    g = torch.Generator().manual_seed(0)
    seen_first_shuffled = set()
    for _ in range(50):
        for v in p.variants(caption, g):
            tags = v.split(", ")
            assert tags[:2] == ["sks", "red collar"]
            assert sorted(tags[2:]) == ["a", "b", "c", "d", "e"]
            seen_first_shuffled.add(tags[2])
    assert len(seen_first_shuffled) == 5  # the rest really is shuffled


def test_variants_distinct_deterministic_and_capped():
    p = CaptionPolicy(CaptionConfig(keep_tokens=1, shuffle=True, shuffle_variants=8))
    few = p.variants("k, a, b, c", torch.Generator().manual_seed(1))
    assert len(few) == 6 and len(set(few)) == 6  # only 3! orders exist
    many = p.variants("k, a, b, c, d, e", torch.Generator().manual_seed(1))
    assert len(many) == 8 and len(set(many)) == 8
    assert many == p.variants("k, a, b, c, d, e", torch.Generator().manual_seed(1))
    assert many != p.variants("k, a, b, c, d, e", torch.Generator().manual_seed(2))
    off = CaptionPolicy(CaptionConfig(shuffle=False))
    assert off.variants("k, a, b", torch.Generator()) == ["k, a, b"]


def _emb(value: float) -> TextEmbedding:
    return TextEmbedding(torch.full((2, 4), value), torch.full((3,), value))


def test_caption_dropout_rate_through_dataset_batches():
    texts = {"sks, a": 1.0, "sks, b": 2.0, "": 0.0, "dog, a": 3.0, "dog, b": 4.0, "sks": 5.0, "dog": 6.0}
    entries = [Entry(torch.zeros(4, 2, 2), (16, 16), ("sks, a", "sks, b"), Path(f"{i}.png"), 1) for i in range(10)]
    extras = {"class_text": {"sks, a": "dog, a", "sks, b": "dog, b", "sks": "dog"}}
    ds = CachedDataset(entries, {t: _emb(v) for t, v in texts.items()}, batch_size=10, seed=3,
                       caption_dropout=0.3, extras=extras, dropped_base="sks", summary={})
    dropped = total = 0
    for index in range(200):
        b = ds.batch(index, torch.Generator().manual_seed(index))
        for i, caption in enumerate(b.captions):
            total += 1
            expected_class = "dog" if caption == "" else caption.replace("sks", "dog")
            assert b.text.context[i, 0, 0].item() == texts[caption]
            assert b.extras["class_text"].context[i, 0, 0].item() == texts[expected_class]
            dropped += caption == ""
    assert total == 2000
    assert abs(dropped / total - 0.3) < 0.045  # ~4.4 standard deviations
