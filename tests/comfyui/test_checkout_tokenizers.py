"""The tokenizers a ComfyUI checkout ships are what the command line reads for FLUX files
(``--tokenizers <checkout>``, or the checkout above ``--comfyui-models``): CLIP-L, T5 and the
Qwen tokenizer of FLUX.2 Klein load from local files and give the known ids."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer_core.models.find_files import find_model_files
from trainer_core.models.text_files import _tokenizer, find_tokenizer

CHECKOUT = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not CHECKOUT, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")


@pytest.mark.parametrize("kind, ids", [("clip_l", [49406, 320, 1125, 539, 48136, 1929, 49407]),
                                       ("t5xxl", [3, 9, 1202, 13, 3, 7, 157, 7, 1782, 1]),
                                       ("qwen3", [64, 6548, 315, 1901, 82, 5562])])
def test_checkout_tokenizers_load(kind, ids):
    assert find_tokenizer(kind, [Path(CHECKOUT)]).is_dir()
    assert _tokenizer(kind, [Path(CHECKOUT)])("a photo of sks dog").input_ids == ids


def test_models_folder_inside_a_checkout_finds_its_tokenizers(tmp_path):
    from tiny_files import write_models

    models = write_models(tmp_path / "ComfyUI", "flux1")
    (tmp_path / "ComfyUI" / "comfy").symlink_to(Path(CHECKOUT) / "comfy", target_is_directory=True)
    files = find_model_files(models=models, model=None)
    assert files.tokenizers == [models.parent]
    assert find_tokenizer("t5xxl", files.tokenizers) == models.parent / "comfy" / "text_encoders" / "t5_tokenizer"
