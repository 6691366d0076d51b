"""The command line trains from model files as ComfyUI keeps them: tiny BFL-layout FLUX.1 and
FLUX.2 (Klein) diffusion models, CLIP-L / T5 / Qwen3 text-encoder files and VAE files with
real tensor names, found by name under ``--comfyui-models``; a wrong file gets an error that
names it and says what it is instead."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_files import harness, write_models

from trainer_core import cli
from trainer_core.models.single_file import describe_file, load_diffusion_model, load_tensors


@pytest.fixture
def quiet_cli(monkeypatch):
    monkeypatch.setattr(cli.StopFlag, "install", lambda self: None)


def _data(root):
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a photo of sks dog", encoding="utf-8")
    return data


def _argv(root, models, *extra):
    return ["train", "--comfyui-models", str(models), "--tokenizers", str(models.parent / "tokenizers"),
            "--data", str(root / "data"), "--output-dir", str(root / "out"), "--name", "run", "--steps", "2",
            "--resolution", "64", "--device", "cpu", "--set", "data.buckets.min_side=32",
            "--set", "train.precision=fp32", "--set", "train.save_every=0", *extra]


FLUX2_KEY = "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"


@pytest.mark.parametrize("arch, encoder, lora_key", [
    ("flux1", "", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"),
    ("flux2", "qwen3", FLUX2_KEY),  # Klein
    ("flux2", "mistral3", FLUX2_KEY),  # FLUX.2-dev: guidance, Mistral with its tokenizer inside the file
])
def test_trains_from_comfyui_model_files(tmp_path, quiet_cli, caplog, arch, encoder, lora_key):
    models = write_models(tmp_path, arch, guidance=encoder != "qwen3", encoder=encoder)
    _data(tmp_path)
    caplog.set_level(logging.INFO)
    previews = ["--set", "preview.every_n_steps=1", "--set", 'preview.prompts=["sks dog"]', "--set", "preview.steps=1",
                "--set", "preview.width=64", "--set", "preview.height=64"] if encoder == "qwen3" else []
    assert cli.main(_argv(tmp_path, models, *previews)) == 0, caplog.text
    run = tmp_path / "out" / "run"
    if previews:  # previews during training and the before/after grid, as in the demo
        assert sorted(p.name for p in (run / "previews").iterdir()) == ["baseline", "final", "step_000001"]
        assert (run / "samples.png").is_file()
    lora = load_file(str(run / "lora_final.safetensors"))
    assert lora_key in lora  # BFL names: what ComfyUI's LoRA loader maps
    assert all(".double_blocks." in k or "_double_blocks_" in k or "single_blocks" in k for k in lora if "alpha" not in k)
    record = json.loads((run / "config.json").read_text())["model"]
    assert record == {"file": models.joinpath("diffusion_models").glob("*.safetensors").__next__().name, "arch": arch}
    assert "dataset " in caplog.text and "buckets: 64x64 ×2" in caplog.text  # the summary came first
    assert caplog.text.index("dataset ") < caplog.text.index("files: model")


def test_wrong_file_kinds_are_named(tmp_path, quiet_cli, caplog):
    models = write_models(tmp_path, "flux1")
    _data(tmp_path)
    caplog.set_level(logging.ERROR)
    vae = models / "vae" / "ae.safetensors"
    assert cli.main(_argv(tmp_path, models, "--model", str(vae))) == 2
    assert f"--model {vae} is a FLUX.1 VAE (16 latent channels), not a FLUX diffusion model" in caplog.text
    caplog.clear()
    clip = models / "text_encoders" / "clip_l.safetensors"
    assert cli.main(_argv(tmp_path, models, "--vae", str(clip))) == 2
    assert f"--vae {clip} is a CLIP-L text encoder, not a FLUX.1 VAE (16 latent channels)" in caplog.text
    caplog.clear()
    assert cli.main(_argv(tmp_path, models, "--t5", "clip_l.safetensors")) == 2
    assert "clip_l.safetensors is a CLIP-L text encoder, not a T5-XXL text encoder" in caplog.text
    caplog.clear()
    flux2_vae = harness.write_tiny_vae(tmp_path / "flux2_vae.safetensors", "flux2", dec_ch=32)
    assert cli.main(_argv(tmp_path, models, "--vae", str(flux2_vae))) == 2
    assert "is a FLUX.2 VAE (32 latent channels), not a FLUX.1 VAE" in caplog.text


def test_ambiguous_and_missing_files_say_where_and_which_flag(tmp_path, quiet_cli, caplog):
    models = write_models(tmp_path, "flux1")
    _data(tmp_path)
    shutil.copy(models / "vae" / "ae.safetensors", models / "vae" / "ae_copy.safetensors")
    caplog.set_level(logging.ERROR)
    assert cli.main(_argv(tmp_path, models)) == 2
    assert "ae.safetensors, ae_copy.safetensors; choose one with --vae NAME" in caplog.text
    caplog.clear()
    assert cli.main(_argv(tmp_path, models, "--vae", "ae.safetensors", "--model", "flux1-krea.safetensors")) == 2
    assert "--model flux1-krea.safetensors: no such file" in caplog.text and str(models / "diffusion_models") in caplog.text
    caplog.clear()
    shutil.rmtree(models.parent / "tokenizers" / "t5xxl")
    assert cli.main(_argv(tmp_path, models, "--vae", "ae.safetensors")) == 2
    assert "no T5-XXL tokenizer found" in caplog.text and "--tokenizers" in caplog.text


def test_scaled_fp8_weights_are_dequantized(tmp_path):
    sd = harness.flux_state_dict("flux1", hidden=128, context_dim=48, vec_dim=32)
    key = "double_blocks.0.img_attn.qkv.weight"
    scale = sd[key].abs().max() / 448
    stored = dict(sd, **{key: (sd[key] / scale).to(torch.float8_e4m3fn), key[:-len("weight")] + "weight_scale": scale})
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in stored.items()}, str(path))
    assert describe_file(path) == "a FLUX.1 diffusion model"
    loaded = load_tensors(path, torch.float32)
    assert key[:-len("weight")] + "weight_scale" not in loaded
    assert torch.allclose(loaded[key], sd[key], rtol=0.07, atol=1e-4)  # fp8 keeps ~3 mantissa bits
    assert not torch.allclose(loaded[key], (sd[key] / scale))  # the scale was applied
    model = load_diffusion_model(path, dtype=torch.float32, device=torch.device("cpu"))
    assert model.arch == "flux1" and model.guidance_embed
    assert torch.equal(model.module.double_blocks[0].img_attn.qkv.weight, loaded[key])


def test_run_config_json_tolerates_sections_only_the_node_reads(tmp_path):
    from trainer_core.config import ConfigError, TrainingConfig

    tree = TrainingConfig().to_dict()
    tree["lora"]["rank"] = 7
    run_file = tmp_path / "config.json"
    run_file.write_text(json.dumps({"format_version": 1, "config": {**tree, "comfyui": {"graph": "..."}},
                                    "model": {"file": "flux1-dev.safetensors", "arch": "flux1"}}))
    args = cli.build_parser().parse_args(["train", "--config", str(run_file), "--data", str(tmp_path)])
    assert cli.make_config(args, {}).lora.rank == 7  # the node-only section is skipped, the rest applies
    from trainer_core.train_command import model_record

    assert model_record(run_file) == {"file": "flux1-dev.safetensors", "arch": "flux1"}
    partial = tmp_path / "partial.json"  # a hand-written config: an unknown section is a typo
    partial.write_text(json.dumps({"lroa": {"rank": 7}}))
    args = cli.build_parser().parse_args(["train", "--config", str(partial), "--data", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown section 'lroa'"):
        cli.make_config(args, {})


def test_text_encoders_in_int8_stay_close_and_are_cached_apart(tmp_path):
    """``--text-encoder-8bit on``: every linear of the encoders is bitsandbytes int8 (here on the
    CPU), the embeddings stay close to full precision, and the encoder's identity (the text
    cache key) differs, so int8 and full-precision embeddings never mix."""
    pytest.importorskip("bitsandbytes")
    from trainer_core.models.find_files import find_model_files
    from trainer_core.models.text_files import load_text_encoder

    models = write_models(tmp_path, "flux1")
    files = find_model_files(models=models, model=None, tokenizers=[tmp_path / "tokenizers"])
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    full = load_text_encoder("flux1", files.text, files.tokenizers, int8="off", **kw)
    small = load_text_encoder("flux1", files.text, files.tokenizers, int8="on", **kw)
    assert not any(type(m).__name__ == "Linear8bitLt" for m in full._t5.modules())
    assert sum(type(m).__name__ == "Linear8bitLt" for m in small._t5.modules()) >= 8
    assert full.identity != small.identity and small.identity.count(":int8") == 2
    a, b = full.encode(["a photo of sks dog"])[0], small.encode(["a photo of sks dog"])[0]
    assert (a.context - b.context).abs().max() <= 0.1 * a.context.abs().max()
    assert (a.pooled - b.pooled).abs().max() <= 0.1 * a.pooled.abs().max()
    assert not torch.equal(a.context, b.context)


def test_t5_in_comfyuis_scaled_fp8_format_loads(tmp_path):
    """``t5xxl_fp8_e4m3fn_scaled``: fp8 weights with a per-layer ``scale_weight`` and a
    ``scaled_fp8`` marker; the loaded encoder gives nearly the fp16 file's embeddings."""
    from trainer_core.models.find_files import find_model_files
    from trainer_core.models.text_files import load_text_encoder

    models = write_models(tmp_path, "flux1")
    full = models / "text_encoders" / "t5xxl_fp16.safetensors"
    scaled = {}
    for key, value in load_file(str(full)).items():
        if key.endswith(".weight") and value.ndim == 2 and key != "shared.weight":
            scale = value.abs().max().float() / 448
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    full.unlink()
    save_file(scaled, str(models / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    files = find_model_files(models=models, model=None, tokenizers=[tmp_path / "tokenizers"])
    assert files.text["t5xxl"].name == "t5xxl_fp8_e4m3fn_scaled.safetensors"
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), int8="off")
    got = load_text_encoder("flux1", files.text, files.tokenizers, **kw).encode(["a photo of sks dog"])[0].context
    write_models(tmp_path / "again", "flux1")  # the same seeds: the fp16 original
    files.text["t5xxl"] = tmp_path / "again" / "models" / "text_encoders" / "t5xxl_fp16.safetensors"
    want = load_text_encoder("flux1", files.text, files.tokenizers, **kw).encode(["a photo of sks dog"])[0].context
    assert (got - want).abs().max() <= 0.1 * want.abs().max() and not torch.equal(got, want)
