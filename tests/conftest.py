"""Shared tiny fixtures: a FLUX.1-shaped transformer small enough that a training step
takes milliseconds on CPU, the demo codec and text encoder, and a few 64 px images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

def pytest_configure(config):
    """Tests use tiny tensors, where torch's intra-op threads cost far more than they save
    (and a loaded 2-core machine makes them spin): one thread unless the caller says otherwise."""
    import os

    torch.set_num_threads(int(os.environ.get("FLOWTRAIN_TEST_THREADS", "1")))


TINY_TRAIN_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=16,
                       axes_dims_rope=(4, 6, 6), guidance_embeds=False)


def tiny_parts(seed: int = 0):
    """(model adapter, codec, text encoder): a 1+1-block FLUX.1 layout, DCT codec, hash text."""
    from diffusers import FluxTransformer2DModel

    from trainer_core.demo.codec import DctCodec
    from trainer_core.demo.text import HashTextEncoder
    from trainer_core.models.diffusers_flux import DiffusersFlux1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FluxTransformer2DModel(**TINY_TRAIN_FLUX)
    return DiffusersFlux1(module), DctCodec(), HashTextEncoder()


def write_images(folder: Path, n: int = 4, size: tuple[int, int] = (64, 64), captions: bool = True) -> list[Path]:
    """``n`` random-colour PNGs (seeded) with ``"sks, image <i>"`` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        if captions:
            (folder / f"img{i}.txt").write_text(f"sks, image {i}", encoding="utf-8")
        paths.append(path)
    return paths


class TinyTraining:
    """Builds configs and runs ``train_lora`` on the tiny parts inside ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.out = root / "out"

    def config(self, **dotted):
        """A small fp32 config; ``dotted`` overrides like ``**{"train.steps": 4}``."""
        from trainer_core.config import TrainingConfig

        tree = TrainingConfig().to_dict()
        base = {"data.path": str(self.data), "data.buckets.resolutions": [64], "data.buckets.step": 16,
                "data.buckets.min_side": 32, "data.captions.trigger_word": "sks", "lora.rank": 4,
                "lora.alpha": 4.0, "optim.lr": 1e-3, "train.steps": 4, "train.precision": "fp32",
                "train.gradient_checkpointing": False, "train.save_every": 0, "train.log_every": 100,
                "train.output_dir": str(self.out), "train.output_name": "run", "loss.sigma_bins": 1}
        for key, value in {**base, **dotted}.items():
            node = tree
            *path, leaf = key.split(".")
            for part in path:
                node = node[part]
            if leaf not in node:
                raise KeyError(key)
            node[leaf] = value
        return TrainingConfig.from_dict(tree)

    def train(self, config, seed: int = 0, **kwargs):
        from trainer_core.session import train_lora

        model, codec, text = tiny_parts(seed)
        return train_lora(config, model, codec, text, **kwargs)


@pytest.fixture
def tiny_training(tmp_path) -> TinyTraining:
    t = TinyTraining(tmp_path)
    write_images(t.data)
    return t
