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


def _comfy_ids(tokenizer, text: str) -> list[int]:
    tokens = tokenizer.tokenize_with_weights(text)
    return [t[0] for t in next(iter(tokens.values()))[0]]


def test_flux2_prompts_tokenize_as_in_comfyui(comfyui, tmp_path):
    """Klein (Qwen3: chat template, padded to 512) and FLUX.2-dev (Mistral: BOS, system and
    instruction template, tokenizer from the file's tekken blob) give ComfyUI's token ids."""
    import torch
    import comfy.text_encoders.flux as comfy_flux
    from tiny_files import tekken_json, write_mistral

    from trainer_core.models.text_files import MistralFlux2Encoder, Qwen3KleinEncoder, mistral_tokenizer

    text = "a photo of sks dog, on the grass"
    qwen = Qwen3KleinEncoder(None, _tokenizer("qwen3", [Path(CHECKOUT)]), "qwen")
    assert qwen._ids([text]).input_ids[0].tolist() == _comfy_ids(comfy_flux.KleinTokenizer(), text)
    blob = torch.tensor(list(tekken_json()), dtype=torch.uint8)
    mistral = MistralFlux2Encoder(None, mistral_tokenizer(write_mistral(tmp_path / "m.safetensors")), "mistral")
    assert mistral._ids(text) == _comfy_ids(comfy_flux.Flux2Tokenizer(tokenizer_data={"tekken_model": blob}), text)
