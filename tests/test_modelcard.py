"""The run folder's README.md model card (modelcard.py)."""
from __future__ import annotations

import logging
import re

import pytest
from tiny_run import make_config, one_thread, train, write_data  # noqa: F401 (fixture)

from trainer_core import modelcard
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.models.variants import ModelShape, detect_variant
from trainer_core.previews import PreviewCallback, demo_renderer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_card_beside_the_lora_names_model_words_settings_data_curve_and_previews(tmp_path):
    write_data(tmp_path / "data", count=4)
    cfg = make_config(tmp_path / "data", steps=2, validation={"every_n_steps": 1, "images": 1},
                      preview={"every_n_steps": 2, "prompts": ["a sks on a table"], "steps": 1},
                      train={"tensorboard": False})
    render = demo_renderer(DctCodec(), HashTextEncoder(), cfg.preview.prompts, "sks", seed=0, steps=1, size=64)
    train(cfg, tmp_path / "run", callbacks=[PreviewCallback(render, 2)])
    run = tmp_path / "run"
    text = (run / "README.md").read_text()
    assert (run / "lora_final.safetensors").is_file()
    assert "A LoRA for **FLUX.1 (unknown size)**" in text  # the tiny test model has no real FLUX.1 proportions
    assert "**`sks`**" in text and "| class word | object |" in text
    assert "| steps | 2 of 2 (finished) |" in text
    assert "| training images | 3 |" in text and "| validation images (held out) | 1 |" in text
    assert "| LoRA rank / alpha | 8 / 8 |" in text and "| learning rate | 0.001 (adamw, constant, warmup 0) |" in text
    assert "`best/lora.safetensors` is the LoRA of step" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["learning_curve.svg", "previews/final/p0_trigger.png", "previews/final/p0_plain.png"]
    assert all((run / link).is_file() for link in links)  # the folder can be shared as it is
    assert "| a sks on a table |" in text


def test_a_failing_card_never_breaks_saving(tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise ValueError("no card today")

    monkeypatch.setattr(modelcard, "model_card", broken)
    write_data(tmp_path / "data", count=2)
    with caplog.at_level(logging.WARNING, logger="trainer_core.modelcard"):
        result, _ = train(make_config(tmp_path / "data", steps=1, train={"tensorboard": False}), tmp_path / "run")
    assert result.lora_path.is_file() and not (tmp_path / "run" / "README.md").exists()
    assert any("no card today" in r.getMessage() for r in caplog.records)


def test_card_names_the_detected_variant_and_skips_missing_previews(tmp_path):
    variant = detect_variant(ModelShape("flux2", 3072, 5, 20, 7680, False))
    cfg = make_config(tmp_path, preview={"every_n_steps": 5, "prompts": ["x"]})
    text = modelcard.model_card(tmp_path, cfg, variant=variant, model_name="flux-2-klein-4b.safetensors", steps=3,
                                reason="stopped", history=[{"loss": 1.0}], dataset_summary={"images": 5})
    assert "A LoRA for **FLUX.2 Klein 4B** (base model file `flux-2-klein-4b.safetensors`)" in text
    assert "exact: hidden 3072, blocks 5+20" in text and "| steps | 3 of 4 (stopped) |" in text
    assert "Final previews" not in text and "learning_curve" not in text  # no such files in this folder
