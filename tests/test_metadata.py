"""LoRA metadata other tools read (lora/metadata.py): the key set, the per-variant names,
the run's dataset facts, and the sd-scripts hashes checked against an independent computation."""
from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import make_config, one_thread, train, write_data  # noqa: F401 (fixture)

from trainer_core.config import TrainingConfig
from trainer_core.lora import io as lora_io
from trainer_core.lora.metadata import RunInfo, with_hashes
from trainer_core.models.variants import ModelShape, detect_variant

# Every kohya / modelspec / sshs key a FlowTrain LoRA carries (sd-scripts FLUX.1 + musubi FLUX.2 names).
EXPECTED_KEYS = {
    "ss_network_dim", "ss_network_alpha", "ss_network_dropout", "ss_network_module", "ss_network_args",
    "ss_resolution", "ss_steps", "ss_max_train_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
    "ss_optimizer", "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_seed", "ss_output_name", "ss_session_id",
    "ss_training_started_at", "ss_training_finished_at", "ss_epoch", "ss_num_epochs", "ss_num_batches_per_epoch",
    "ss_num_train_images", "ss_num_train_items", "ss_num_validation_images", "ss_num_reg_images",
    "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_batch_size_per_device", "ss_total_batch_size",
    "ss_gradient_accumulation_steps", "ss_gradient_checkpointing", "ss_mixed_precision", "ss_full_fp16",
    "ss_full_bf16", "ss_max_grad_norm", "ss_cache_latents", "ss_enable_bucket", "ss_bucket_no_upscale",
    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_flip_aug", "ss_color_aug", "ss_random_crop",
    "ss_shuffle_caption", "ss_keep_tokens", "ss_caption_dropout_rate", "ss_caption_tag_dropout_rate",
    "ss_noise_offset", "ss_multires_noise_discount", "ss_ip_noise_gamma", "ss_min_snr_gamma", "ss_loss_type",
    "ss_huber_schedule", "ss_huber_c", "ss_training_comment", "ss_model_type", "ss_guidance_scale",
    "ss_timestep_sampling", "ss_sigmoid_scale", "ss_logit_mean", "ss_logit_std", "ss_discrete_flow_shift",
    "ss_weighting_scheme", "ss_model_prediction_type", "ss_base_model_version", "ss_sd_model_name",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.trigger_phrase",
    "sshs_model_hash", "sshs_legacy_hash",
}


@pytest.mark.usefixtures("one_thread")
def test_trained_file_carries_the_full_key_set_and_the_run_facts(tmp_path):
    write_data(tmp_path / "data", count=3)
    cfg = make_config(tmp_path / "data", steps=3, optim={"warmup_steps": 1}, flow={"guidance": 2.5})
    from tiny_run import tiny_model
    from trainer_core.demo.codec import DctCodec
    from trainer_core.demo.text import HashTextEncoder
    from trainer_core.session import train_lora

    result = train_lora(cfg, tiny_model(), DctCodec(), HashTextEncoder(), run_dir=tmp_path / "run",
                        base_model="fingerprint:abc", model_name="my-flux.safetensors")
    with safe_open(str(result.lora_path), framework="pt") as f:
        md = dict(f.metadata())
    assert {k for k in md if not k.startswith("flowtrain.")} == EXPECTED_KEYS
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_sd_model_name"] == "my-flux.safetensors" and md["flowtrain.base_model"] == "fingerprint:abc"
    # the tiny diffusers model (1 + 1 blocks) has no FLUX.1 proportions: generic FLUX.1
    assert (md["ss_base_model_version"], md["flowtrain.variant"]) == ("flux1", "flux1")
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["modelspec.resolution"] == "64x64" and md["modelspec.trigger_phrase"] == "sks"
    assert datetime.fromisoformat(md["modelspec.date"]).tzinfo is not None
    assert (md["ss_guidance_scale"], md["ss_lr_warmup_steps"], md["ss_mixed_precision"]) == ("2.5", "1", "no")
    assert (md["ss_num_train_images"], md["ss_epoch"], md["ss_steps"]) == ("6", "1", "3")  # 3 images × 2 repeats
    started, finished = float(md["ss_training_started_at"]), float(md["ss_training_finished_at"])
    assert started <= finished
    dirs = json.loads(md["ss_dataset_dirs"])
    assert dirs == {"2_sks": {"n_repeats": 2, "img_count": 3}}  # the demo folder repeats twice
    tags = json.loads(md["ss_tag_frequency"])["2_sks"]
    assert tags["sks"] == 3  # the trigger word is in every caption, counted once per image
    buckets = json.loads(md["ss_bucket_info"])["buckets"]
    assert buckets == {"0": {"resolution": [64, 64], "count": 6}}


def _independent_hashes(path) -> tuple[str, str]:
    """sd-scripts' definition, computed another way: re-save the file's tensors with only
    its ss_* metadata, then hash the bytes after the header, and 64 KiB at 1 MiB."""
    with safe_open(str(path), framework="pt") as f:
        ss = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    again = path.with_name("ss_only.safetensors")
    save_file(load_file(str(path)), str(again), metadata=ss)
    raw = again.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def test_hashes_match_an_independent_computation(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(256, 1536, generator=g),  # 1.5 MiB: past the 1 MiB offset
               "lora_unet_a.lora_up.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16)}
    md = lora_io.build_metadata(TrainingConfig(), arch="flux1", steps=1, trigger_word="", base_model="x")
    path = tmp_path / "l.safetensors"
    lora_io.save_lora_file(str(path), tensors, with_hashes(tensors, md))
    with safe_open(str(path), framework="pt") as f:
        saved = f.metadata()
    model_hash, legacy = _independent_hashes(path)
    assert saved["sshs_model_hash"] == model_hash and saved["sshs_legacy_hash"] == legacy
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]  # the 64 KiB window held data
    # the model hash is over the tensors only: other metadata does not change it
    assert with_hashes(tensors, {"ss_x": "1"})["sshs_model_hash"] == model_hash
    changed = dict(tensors, **{"lora_unet_a.lora_up.weight": tensors["lora_unet_a.lora_up.weight"] + 1})
    assert with_hashes(changed, md)["sshs_model_hash"] != model_hash


@pytest.mark.parametrize("shape, version, architecture, impl", [
    (("flux1", 3072, 19, 38, 4096, True), "flux1", "flux-1-dev/lora", "flux"),
    (("flux1", 3072, 19, 38, 4096, False), "flux1", "flux-1-schnell/lora", "flux"),
    (("flux2", 6144, 8, 48, 15360, True), "flux_2_dev", "Flux.2-dev/lora", "flux2"),
    (("flux2", 4096, 8, 24, 12288, False), "flux_2_klein_9b", "Flux.2-klein-9b/lora", "flux2"),
    (("flux2", 3072, 5, 20, 7680, False), "flux_2_klein_4b", "Flux.2-klein-4b/lora", "flux2"),
])
def test_variant_names_in_metadata(shape, version, architecture, impl):
    run = RunInfo(variant=detect_variant(ModelShape(*shape)))
    md = lora_io.build_metadata(TrainingConfig(), arch=shape[0], steps=1, trigger_word="", base_model="", run=run)
    assert (md["ss_base_model_version"], md["modelspec.architecture"]) == (version, architecture)
    assert md["modelspec.implementation"] == f"https://github.com/black-forest-labs/{impl}"
    assert md["modelspec.sai_model_spec"] == ("1.0.1" if shape[0] == "flux1" else "1.0.0")


@pytest.mark.parametrize("shape, version, architecture, spec", [
    # a FLUX.1 edit LoRA is named as musubi-tuner names FLUX.1 Kontext LoRAs
    (("flux1", 3072, 19, 38, 4096, True), "flux_kontext", "Flux.1-dev/lora", "1.0.0"),
    (("flux1", 3072, 2, 4, 4096, True), "flux_kontext", "Flux.1-dev/lora", "1.0.0"),  # a scaled-down FLUX.1
    # FLUX.2 edits natively: its edit LoRAs keep FLUX.2's names
    (("flux2", 4096, 8, 24, 12288, False), "flux_2_klein_9b", "Flux.2-klein-9b/lora", "1.0.0"),
])
def test_edit_lora_names_in_metadata(shape, version, architecture, spec):
    run = RunInfo(variant=detect_variant(ModelShape(*shape)))
    edit = TrainingConfig.from_dict({"data": {"control_images": True}})
    md = lora_io.build_metadata(edit, arch=shape[0], steps=1, trigger_word="", base_model="", run=run)
    assert (md["ss_base_model_version"], md["modelspec.architecture"], md["modelspec.sai_model_spec"]) == (
        version, architecture, spec)
    assert md["flowtrain.variant"] == run.variant.variant.name  # our own key: the detected model
    plain = lora_io.build_metadata(TrainingConfig(), arch=shape[0], steps=1, trigger_word="", base_model="", run=run)
    assert plain["ss_base_model_version"] == run.variant.variant.base_model_version
