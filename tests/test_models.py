"""DiffusersFlux1 adapter and the local diffusers-folder loader, on tiny real models."""
from __future__ import annotations

import json
import re
import shutil

import peft
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from trainer_core.demo.text import HashTextEncoder
from trainer_core.demo.tiny import tiny_flux1
from trainer_core.models.diffusers_flux import DiffusersFlux1, image_ids, pack_latents, unpack_latents
from trainer_core.models.local import SUBFOLDERS, load_diffusers_flux_folder
from trainer_core.types import BflSlot, FlowModel, TextBatch


def _text(batch: int, prompt: str = "sks, a red ring object") -> TextBatch:
    return TextBatch.collate(HashTextEncoder().encode([prompt] * batch))


def _inputs(b=2, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g) * 0.9 + 0.05


# ------------------------------------------------------------------ adapter
def test_adapter_protocol_and_velocity_shape():
    model = DiffusersFlux1(tiny_flux1())
    assert isinstance(model, FlowModel)
    assert (model.arch, model.latent_channels, model.pixel_multiple) == ("flux1", 16, 16)
    assert model.image_tokens((4, 6)) == 6
    x, sigma = _inputs()
    v = model.velocity(x, sigma, _text(2), guidance=1.0)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert v.abs().sum() > 0


def test_pack_unpack_match_diffusers_pipeline_and_round_trip():
    x = torch.randn(2, 16, 6, 4)
    tokens = pack_latents(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(tokens, 6, 4), x)
    # the pipeline's unpack takes pixel sizes and the VAE factor
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 32, 8), x)
    expected = FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 4), expected)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def _spy(module):
    seen = {}

    def hook(mod, args, kwargs):
        seen.update(kwargs)

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_guidance_only_for_guidance_models():
    x, sigma = _inputs()
    dev = tiny_flux1(guidance=True)
    seen = _spy(dev)
    DiffusersFlux1(dev).velocity(x, sigma, _text(2), guidance=3.5)
    assert torch.equal(seen["guidance"], torch.full((2,), 3.5))
    assert torch.equal(seen["timestep"], sigma)  # σ in (0, 1); the model scales by 1000
    assert seen["img_ids"].shape == (6, 3) and seen["hidden_states"].shape == (2, 6, 64)
    assert not seen["txt_ids"].any() and seen["txt_ids"].shape == (seen["encoder_hidden_states"].shape[1], 3)

    schnell = tiny_flux1(guidance=False)
    seen = _spy(schnell)
    v = DiffusersFlux1(schnell).velocity(x, sigma, _text(2), guidance=3.5)
    assert seen["guidance"] is None and v.shape == x.shape


def test_guidance_value_changes_the_prediction():
    model = DiffusersFlux1(tiny_flux1())
    x, sigma = _inputs()
    a = model.velocity(x, sigma, _text(2), guidance=1.0)
    b = model.velocity(x, sigma, _text(2), guidance=4.0)
    assert not torch.allclose(a, b)


def test_inputs_cast_to_module_dtype():
    model = DiffusersFlux1(tiny_flux1().to(torch.bfloat16))
    x, sigma = _inputs()
    v = model.velocity(x, sigma, _text(2))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_missing_pooled_is_a_clear_error():
    model = DiffusersFlux1(tiny_flux1())
    x, sigma = _inputs()
    text = _text(2)
    with pytest.raises(ValueError, match="pooled"):
        model.velocity(x, sigma, TextBatch(text.context, None))


def _lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    module = tiny_flux1(seed=1)
    module.requires_grad_(False)
    model = DiffusersFlux1(module, gradient_checkpointing=checkpointing)
    assert module.gradient_checkpointing is checkpointing
    targets = ["to_q", "to_v", "proj_mlp"]
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG
        torch.manual_seed(2)
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=targets), module)
    g = torch.Generator().manual_seed(3)
    lora = {n: p for n, p in module.named_parameters() if "lora_" in n}
    with torch.no_grad():  # B is zero at init, which would zero A's gradient
        for n, p in lora.items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    x, sigma = _inputs()
    module.train()
    loss = model.velocity(x, sigma, _text(2)).pow(2).mean()
    loss.backward()
    return {n: p.grad for n, p in lora.items()}


def test_lora_backward_with_and_without_checkpointing(monkeypatch):
    plain = _lora_grads(False)
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    ckpt = _lora_grads(True)
    assert calls == [False] * 4  # every block recomputed, non-reentrant
    assert len(plain) == 2 * (2 * 2 + 2 * 3)  # (A, B) × (q, v in 2 double + q, v, mlp in 2 single)
    for grads in (plain, ckpt):
        for name, grad in grads.items():
            assert grad is not None, name
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for name in plain:  # recomputation must give the same gradients
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-7)


def test_default_targets_and_bfl_names():
    module = tiny_flux1()
    model = DiffusersFlux1(module)
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    attention = [n for n in names if re.fullmatch(model.default_targets["attention"], n)]
    every = [n for n in names if re.fullmatch(model.default_targets["all"], n)]
    assert "transformer_blocks.0.attn.to_q" in attention
    mlp = "single_transformer_blocks.1.proj_mlp"
    assert mlp in every and mlp not in attention
    assert set(attention) < set(every)
    assert not any("norm" in n or "embed" in n for n in every)
    assert model.bfl_name("single_transformer_blocks.1.proj_mlp") == BflSlot(
        "single_blocks.1.linear1", 3, (256, 256, 256, 1024)
    )
    qkv = BflSlot("double_blocks.0.img_attn.qkv", 1, (256,) * 3)
    assert model.bfl_name("transformer_blocks.0.attn.to_k") == qkv
    assert model.bfl_name("norm_out.linear") is None


def test_rejects_a_non_flux_module():
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        DiffusersFlux1(torch.nn.Linear(4, 4))


# ------------------------------------------------------------------ local folder loading
WORDS = "a photo of sks red ring object on blue background".split()


def _save_tokenizer(folder, max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
        model_max_length=max_length,
    )
    fast.save_pretrained(folder)


def _tiny_transformer(guidance: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("flux1-dev")
    torch.manual_seed(0)
    _tiny_transformer(True).save_pretrained(root / "transformer")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(root / "vae")
    vocab = len(WORDS) + 4
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=3, pad_token_id=0, bos_token_id=2,
    )).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=3,
    )).save_pretrained(root / "text_encoder_2")
    _save_tokenizer(root / "tokenizer", 77)
    _save_tokenizer(root / "tokenizer_2", 512)
    return root


def test_load_dev_folder_round_trip(flux_folder):
    model, codec, text = load_diffusers_flux_folder(flux_folder, dtype=torch.float32)
    saved = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    torch.testing.assert_close(model.module.x_embedder.weight, saved.x_embedder.weight, rtol=0, atol=0)
    assert model.has_guidance and text.max_length == 512

    emb = text.encode(["a photo of sks", "red ring"])
    assert emb[0].context.shape == (512, 32) and emb[0].pooled.shape == (24,)
    assert not torch.equal(emb[0].pooled, emb[1].pooled)
    assert str(flux_folder) in text.identity and "512" in text.identity

    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (1, 16, 4, 6) and codec.downscale == 8 and z.dtype == torch.float32
    raw = codec._vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)  # mean, shifted and scaled
    out = codec.decode(z)
    assert out.shape == pixels.shape and out.abs().max() <= 1
    torch.testing.assert_close(out, codec._vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert str(flux_folder) in codec.identity

    v = model.velocity(z, torch.tensor([0.5]), TextBatch.collate(emb[:1]), guidance=1.0)
    assert v.shape == z.shape

    codec.release()
    text.release()
    with pytest.raises(RuntimeError, match="released"):
        codec.encode(pixels)
    with pytest.raises(RuntimeError, match="released"):
        text.encode(["a"])


def test_load_schnell_folder_uses_256_tokens(flux_folder, tmp_path):
    root = tmp_path / "schnell"
    shutil.copytree(flux_folder, root)
    shutil.rmtree(root / "transformer")
    _tiny_transformer(False).save_pretrained(root / "transformer")
    model, _, text = load_diffusers_flux_folder(root, dtype=torch.float32)
    assert not model.has_guidance and text.max_length == 256
    assert text.encode(["sks"])[0].context.shape == (256, 32)


def _skeleton(root, class_name="FluxTransformer2DModel", skip=()):
    for name in SUBFOLDERS:
        if name not in skip:
            (root / name).mkdir(parents=True)
    if "transformer" not in skip:
        (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name}))
    return root


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_diffusers_flux_folder(tmp_path / "nowhere", dtype=torch.float32)
    with pytest.raises(ValueError, match="tokenizer_2"):
        load_diffusers_flux_folder(_skeleton(tmp_path / "a", skip=("tokenizer_2",)), dtype=torch.float32)
    with pytest.raises(ValueError, match="Flux2Transformer2DModel"):
        load_diffusers_flux_folder(_skeleton(tmp_path / "b", "Flux2Transformer2DModel"), dtype=torch.float32)


def test_base_quantization_is_refused_where_bitsandbytes_cannot_run(flux_folder, monkeypatch):
    from trainer_core.config import ConfigError, TrainConfig
    from trainer_core.models import local

    assert TrainConfig().base_quantization == "none"
    with pytest.raises(ConfigError, match="base_quantization"):
        TrainConfig(base_quantization="int4")
    for kind in ("int8", "nf4"):
        with pytest.raises(ValueError, match=rf"train.base_quantization='{kind}' needs a CUDA GPU.*cpu.*=none"):
            load_diffusers_flux_folder(flux_folder, dtype=torch.bfloat16, device="cpu", base_quantization=kind)
    assert local.bnb_quantization_config("none", dtype=torch.bfloat16, device="cpu") is None
    config = local.bnb_quantization_config("nf4", dtype=torch.bfloat16, device="cuda")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert local.bnb_quantization_config("int8", dtype=torch.bfloat16, device="cuda").load_in_8bit
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        local.bnb_quantization_config("int8", dtype=torch.bfloat16, device="cuda")


def test_diffusers_adapter_attends_with_sdpa():
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    model = DiffusersFlux1(tiny_flux1())
    x, sigma = _inputs()
    with Record():
        model.velocity(x, sigma, _text(2), guidance=1.0)
    assert seen  # diffusers dispatches to SDPA (its "native" backend), not a math loop
