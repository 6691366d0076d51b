"""NaN from an encoder (a VAE or text encoder with broken weights) stops the run before
the first step, naming the image or caption file and the encoder, and is never cached;
a non-finite entry already in the cache is not reused."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tiny_run import tiny_model
from trainer_core.data.cache import EncoderOutputError
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.session import train_lora


class BlackIsNaN(DctCodec):
    """A broken VAE: NaN latents for an all-black image."""

    identity = "broken-vae-v1"

    def encode(self, pixels):
        latents = super().encode(pixels)
        black = pixels.flatten(1).amax(1) <= -0.99
        latents[black] = float("nan")
        return latents


class PoisonIsNaN(HashTextEncoder):
    """A broken text encoder: NaN embeddings for captions containing 'poison'."""

    def encode(self, texts):
        out = super().encode(texts)
        for text, emb in zip(texts, out):
            if "poison" in text:
                emb.context[:] = float("nan")
        return out


def _run(tiny_training, config, codec=None, text=None, **kwargs):
    return train_lora(config, tiny_model(0), codec or DctCodec(), text or HashTextEncoder(), **kwargs)


def test_nan_latent_names_the_image_and_the_vae(tiny_training):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tiny_training.data / "black.png")
    steps = []
    with pytest.raises(EncoderOutputError) as e:
        _run(tiny_training, tiny_training.config(), codec=BlackIsNaN(), progress=lambda *a: steps.append(a))
    msg = str(e.value)
    assert "black.png" in msg and "img0.png" not in msg and "'broken-vae-v1'" in msg
    assert "weights are likely broken" in msg and "not a learning-rate problem" in msg
    assert not steps  # before the first step
    cached = list((tiny_training.out / "run" / ".latent_cache" / "latents").glob("*.safetensors"))
    assert all(torch.isfinite(t).all() for p in cached for t in load_file(p).values())


def test_nan_text_embedding_names_the_caption_file_and_encoder(tiny_training):
    (tiny_training.data / "img2.txt").write_text("sks, poison apple", encoding="utf-8")
    with pytest.raises(EncoderOutputError) as e:
        _run(tiny_training, tiny_training.config(), text=PoisonIsNaN())
    msg = str(e.value)
    assert "poison apple" in msg and "img2.txt" in msg and HashTextEncoder().identity in msg
    assert "text encoder" in msg and "not a learning-rate problem" in msg


def test_nan_in_the_cache_is_not_reused(tiny_training, caplog):
    cfg = tiny_training.config(**{"train.steps": 1, "data.cache_dir": str(tiny_training.root / "cache")})
    _run(tiny_training, cfg)
    latent_file = sorted((tiny_training.root / "cache" / "latents").glob("*.safetensors"))[0]
    text_file = sorted((tiny_training.root / "cache" / "text").glob("*.safetensors"))[0]
    save_file({"latent": torch.full((16, 8, 8), float("nan"))}, str(latent_file))
    save_file({"context": torch.full((4, 64), float("inf"))}, str(text_file))
    caplog.set_level(logging.WARNING)
    again = tiny_training.config(**{"train.steps": 1, "train.output_name": "again",
                                    "data.cache_dir": str(tiny_training.root / "cache")})
    result = _run(tiny_training, again)
    cache = result.dataset_summary["cache"]
    assert (cache["latent_misses"], cache["text_misses"]) == (1, 1)  # both encoded again
    assert "holds NaN/inf" in caplog.text and latent_file.name in caplog.text and text_file.name in caplog.text
    assert np.isfinite(result.history[0]["loss"])
