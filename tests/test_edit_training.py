"""Edit LoRAs on paired data, end to end on the CPU with the tiny FLUX.1 parts: references
condition the prediction (target tokens only), a short training on a learnable edit
(reference → its red/blue swap) lowers the loss on fixed inputs, and validation, DOP and
previews carry the references."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import make_config, one_thread, tiny_model, train  # noqa: F401 (fixture)

from trainer_core.config import ConfigError
from trainer_core.data.dataset import prepare_dataset
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.edit_dataset import INSTRUCTION, write_edit_dataset
from trainer_core.demo.text import HashTextEncoder
from trainer_core.flow import interpolate, velocity_target
from trainer_core.previews import PreviewCallback, demo_renderer
from trainer_core.types import TextBatch

pytestmark = pytest.mark.usefixtures("one_thread")

EDIT = {"control_images": True, "batch_size": 4, "captions": {"trigger_word": "sks", "class_word": "object"}}


def _dataset(config, root: Path):
    return prepare_dataset(config.data, DctCodec(), HashTextEncoder(), cache_dir=root / "probe_cache",
                           pixel_multiple=16, seed=0)


def _probe(model, dataset, references: bool = True) -> float:
    """Velocity MSE over every entry at fixed σ and noise (the same inputs before and after)."""
    g = torch.Generator().manual_seed(5)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in dataset.entries:
            x0 = e.latent[None].float()
            text = TextBatch.collate([dataset.embeddings[e.texts[0]]])
            refs = [r[None].float() for r in e.references] if references else []
            for s in (0.3, 0.5, 0.7):
                noise = torch.randn(x0.shape, generator=g)
                sigma = torch.full((1,), s)
                v = model.velocity(interpolate(x0, noise, sigma), sigma, text, 1.0, references=refs)
                total += float(((v - velocity_target(x0, noise)) ** 2).mean())
                n += 1
    return total / n


def test_references_condition_the_prediction_and_only_targets_come_back():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    text = TextBatch(torch.randn(2, 5, 64, generator=g), torch.randn(2, 16, generator=g))
    sigma = torch.tensor([0.3, 0.7])
    refs = [torch.randn(2, 16, 8, 8, generator=g)]
    with torch.no_grad():
        plain = model.velocity(x, sigma, text, references=None)
        edited = model.velocity(x, sigma, text, references=refs)
        other = model.velocity(x, sigma, text, references=[refs[0].flip(0)])
        two = model.velocity(x, sigma, text, references=refs + [torch.randn(2, 16, 4, 8, generator=g)])
    assert edited.shape == plain.shape == two.shape == x.shape
    assert (edited - plain).abs().max() > 1e-4  # the reference tokens are attended to
    assert (edited[0] - other[0]).abs().max() > 1e-4  # each sample sees its own reference
    assert (two - edited).abs().max() > 1e-4
    with pytest.raises(ValueError, match="reference 0 has shape"):
        model.velocity(x, sigma, text, references=[torch.randn(1, 16, 8, 8)])


def test_edit_lora_learns_the_edit(tmp_path):
    write_edit_dataset(tmp_path / "data", count=4)
    config = make_config(tmp_path / "data", steps=25, data=EDIT, optim={"lr": 1e-2},
                         flow={"sigma_scheme": "sigmoid", "sigmoid_std": 0.1})
    dataset = _dataset(config, tmp_path)
    assert all(len(e.references) == 1 for e in dataset.entries)
    model = tiny_model()
    before = _probe(model, dataset)
    result, model = train(config, tmp_path / "run", model=model)
    after = _probe(model, dataset)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses)
    print(f"edit LoRA probe loss {before:.4f} -> {after:.4f}; step loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert after < 0.9 * before, (before, after)  # measured: 2.52 -> 2.19 (-13 %)


def test_edit_config_refuses_live_augmentation_and_models_without_references(tmp_path):
    write_edit_dataset(tmp_path / "data", count=2)
    with pytest.raises(ConfigError, match="random_crop"):
        make_config(tmp_path / "data", data={"control_images": True, "augment": {"random_crop": True}})

    class NoRefs:  # a FlowModel without reference support
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "supports_references":
                raise AttributeError(name)
            return getattr(self.inner, name)

    with pytest.raises(ConfigError, match="takes no reference images"):
        train(make_config(tmp_path / "data", data=EDIT), tmp_path / "run", model=NoRefs(tiny_model()))
    assert not (tmp_path / "run").exists()


class SpyModel:
    """Records whether every velocity call got references."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def velocity(self, x, sigma, text, guidance=None, references=None):
        self.calls.append(len(references or ()))
        return self.inner.velocity(x, sigma, text, guidance, references=references)


def test_validation_and_dop_pass_the_references(tmp_path):
    write_edit_dataset(tmp_path / "data", count=4)
    config = make_config(tmp_path / "data", steps=3, data={**EDIT, "batch_size": 1},
                         dop={"enabled": True}, validation={"every_n_steps": 1, "images": 1})
    model = SpyModel(tiny_model())
    result, _ = train(config, tmp_path / "run", model=model)
    assert "dop" in result.history[-1]["terms"]
    assert model.calls and all(n == 1 for n in model.calls), model.calls
    assert (tmp_path / "run" / "validation.json").is_file()


def test_previews_edit_a_held_reference_with_and_without_the_lora(tmp_path):
    write_edit_dataset(tmp_path / "data", count=3)
    config = make_config(tmp_path / "data", steps=4, data={**EDIT, "batch_size": 1}, optim={"lr": 3e-2},
                         validation={"every_n_steps": 2, "images": 1})
    render = demo_renderer(DctCodec(), HashTextEncoder(), [INSTRUCTION], "sks", seed=1, steps=3, size=64)
    cb = PreviewCallback(render, every_n_steps=10)
    train(config, tmp_path / "run", callbacks=[cb])
    final = tmp_path / "run" / "previews" / "final"
    names = sorted(p.name for p in cb.rendered["final"])
    assert names == ["p0_edit_base.png", "p0_edit_lora.png", "reference.png"]
    lora, base = (np.asarray(Image.open(final / f"p0_edit_{k}.png"), dtype=np.int16) for k in ("lora", "base"))
    assert lora.shape == base.shape == (64, 64, 3)
    assert np.abs(lora - base).max() > 0  # the LoRA changes the edit
    baseline = tmp_path / "run" / "previews" / "baseline"
    assert np.array_equal(np.asarray(Image.open(baseline / "p0_edit_lora.png")),
                          np.asarray(Image.open(baseline / "p0_edit_base.png")))  # zero LoRA at step 0
