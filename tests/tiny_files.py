"""Tiny model files as ComfyUI users keep them, written into a temporary ``models/`` folder:
BFL-layout FLUX.1 / FLUX.2 diffusion models (``harness.flux_state_dict``), FLUX VAEs
(``harness.vae_state_dict``), and CLIP-L / T5 / Qwen3 text encoders with random weights and the
real tensor names (saved from tiny transformers models), plus word-level tokenizers in the
folders ``--tokenizers`` reads (``clip_l/``, ``t5xxl/``, ``qwen3/``)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfyui"))
import harness  # noqa: E402

WORDS = ["a", "photo", "of", "sks", "dog", "cat", "red", "blue", "on", "the", "grass", "object", "ring"]
CLIP_HIDDEN, T5_D, QWEN_HIDDEN = 32, 48, 16


def write_tokenizer(folder: Path, *, bos: str, eos: str, pad: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(["<unk>", bos, eos, pad]))
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos,
                                   pad_token=pad, model_max_length=77)
    fast.save_pretrained(str(folder))
    return folder


def _save(model: torch.nn.Module, path: Path, prefix: str = "", drop: tuple[str, ...] = ()) -> Path:
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_clip_l(path: Path, vocab: int) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=1, eos_token_id=2)
    model = CLIPTextModel(cfg)  # ComfyUI's clip_l files name every tensor text_model.*
    prefix = "" if all(k.startswith("text_model.") for k in model.state_dict()) else "text_model."
    return _save(model, path, prefix=prefix, drop=("text_model.embeddings.position_ids", "embeddings.position_ids"))


def write_t5(path: Path, vocab: int) -> Path:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    cfg = T5Config(vocab_size=vocab, d_model=T5_D, d_kv=64, num_heads=2, d_ff=64, num_layers=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return _save(T5EncoderModel(cfg), path, drop=("encoder.embed_tokens.weight",))


def write_qwen3(path: Path, vocab: int) -> Path:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=28,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return _save(Qwen3Model(cfg), path, prefix="model.")


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]


def tekken_json() -> bytes:
    """A minimal tekken vocabulary (Mistral's format): the special tokens, then one token per byte."""
    import base64
    import json

    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": chr(i)} for i in range(256)]
    specials = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(MISTRAL_SPECIALS)]
    config = {"pattern": r"\s+|\S+", "num_vocab_tokens": 256 + len(specials), "default_vocab_size": 256 + len(specials),
              "default_num_special_tokens": len(specials), "version": "v7"}
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": specials}).encode()


def write_mistral(path: Path) -> Path:
    """A tiny Mistral text encoder as ComfyUI ships FLUX.2-dev's: ``model.*`` weights plus the
    tokenizer as a ``tekken_model`` uint8 tensor; 31 layers (FLUX.2 reads layers 10, 20, 30)."""
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(4)
    cfg = MistralConfig(vocab_size=256 + len(MISTRAL_SPECIALS), hidden_size=QWEN_HIDDEN, intermediate_size=32,
                        num_hidden_layers=31, num_attention_heads=1, num_key_value_heads=1, head_dim=128)
    sd = {"model." + k: v.contiguous() for k, v in MistralModel(cfg).state_dict().items()}
    sd["tekken_model"] = torch.tensor(list(tekken_json()), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_models(root: Path, arch: str = "flux1", *, guidance: bool = True, encoder: str = "qwen3") -> Path:
    """``root/models/{diffusion_models,text_encoders,vae}`` and ``root/tokenizers`` for ``arch``
    (FLUX.2 with the Qwen3 encoder of Klein, or ``encoder="mistral3"`` as FLUX.2-dev); returns
    the models folder."""
    models = root / "models"
    tok = root / "tokenizers"
    vocab = len(WORDS) + 4
    if arch == "flux1":
        write_tokenizer(tok / "clip_l", bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
        write_tokenizer(tok / "t5xxl", bos="<s>", eos="</s>", pad="<pad>")
        write_clip_l(models / "text_encoders" / "clip_l.safetensors", vocab)
        write_t5(models / "text_encoders" / "t5xxl_fp16.safetensors", vocab)
        kw = dict(context_dim=T5_D, vec_dim=CLIP_HIDDEN)
        name = "flux1-dev.safetensors" if guidance else "flux1-schnell.safetensors"
    elif encoder == "mistral3":
        write_mistral(models / "text_encoders" / "mistral_3_small_flux2_bf16.safetensors")
        kw = dict(context_dim=3 * QWEN_HIDDEN)
        name = "flux2_dev.safetensors"
    else:
        write_tokenizer(tok / "qwen3", bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
        write_qwen3(models / "text_encoders" / "qwen_3_4b.safetensors", vocab)
        kw = dict(context_dim=3 * QWEN_HIDDEN)
        name = "flux-2-klein-4b.safetensors"
    harness.write_tiny_flux(models / "diffusion_models" / name, arch, guidance=guidance, hidden=128, **kw)
    vae = harness.vae_state_dict(arch, dec_ch=32, enc_ch=32, dtype=torch.float32)
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file(vae, str(models / "vae" / ("ae.safetensors" if arch == "flux1" else "flux2-vae.safetensors")))
    return models
