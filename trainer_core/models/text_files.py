"""Text-encoder files as ComfyUI keeps them (``models/text_encoders`` or ``models/clip``).

Each file is a transformers model's state dict (ComfyUI's ``clip_l.safetensors``,
``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn_scaled.safetensors``, ``qwen_3_4b.safetensors``),
so the model is built from a config read off the tensor shapes and loaded with no download:

========  ===============================  ======================================================
kind      transformers model               conditioning
========  ===============================  ======================================================
clip_l    ``CLIPTextModel``                FLUX.1 pooled vector (``pooler_output``, 77 tokens)
t5xxl     ``T5EncoderModel``               FLUX.1 context (512 tokens dev, 256 schnell)
qwen3     ``Qwen3Model``                   FLUX.2 Klein context: hidden states entering layers
                                           9, 18 and 27, concatenated per token (3·hidden wide),
                                           prompt in Qwen's chat template, padded to 512 tokens
                                           (``comfy/text_encoders/flux.py`` KleinTokenizer)
mistral3  ``MistralModel``                 FLUX.2-dev context: hidden states entering layers 10, 20
                                           and 30 (3·5120 = 15360 wide), a BOS token and the prompt in
                                           the system/instruction template, one caption at a time (no
                                           padding; the model pads to 512: ``Family.context_tokens``)
========  ===============================  ======================================================

ComfyUI's Mistral files carry their tokenizer (the ``tekken_model`` tensor: tekken JSON bytes);
it is converted with transformers' ``MistralConverter``. Head dim 128 (as ComfyUI fixes it).

Tokenizers are files too and never downloaded: ``find_tokenizer`` looks in the folders given
(``--tokenizers``: a folder with ``clip_l/``, ``t5xxl/``, ``qwen3/`` subfolders, or a ComfyUI
checkout, which ships all three: ``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer``,
``comfy/text_encoders/qwen25_tokenizer``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..types import TextEmbedding
from .local import Flux1TextEncoder, _collect
from .single_file import describe_file, header, load_tensors

log = logging.getLogger(__name__)

TOKENIZER_PATHS = {
    "clip_l": "comfy/sd1_tokenizer",
    "t5xxl": "comfy/text_encoders/t5_tokenizer",
    "qwen3": "comfy/text_encoders/qwen25_tokenizer",
}
KIND_NAMES = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL", "qwen3": "Qwen3", "mistral3": "Mistral"}
QWEN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_LAYERS = (9, 18, 27)
QWEN_TOKENS = 512
MISTRAL_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses "
                    "focusing on object relationships, object\nattribution and actions without speculation."
                    "[/SYSTEM_PROMPT][INST]{}[/INST]")
MISTRAL_LAYERS = (10, 20, 30)
MISTRAL_HEAD_DIM = 128
_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.", "text_encoders.qwen3_4b.transformer.",
             "cond_stage_model.transformer.", "transformer.")


def text_kind(names: Iterable[str]) -> Optional[str]:
    """"clip_l" | "t5xxl" | "qwen3" | "mistral3" | None, from tensor names."""
    names = list(names)
    has = lambda pattern: any(re.search(pattern, k) for k in names)  # noqa: E731
    if has(r"embeddings\.token_embedding\.weight$") and has(r"encoder\.layers\.0\.self_attn\.q_proj\.weight$"):
        return "clip_l"
    if has(r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$"):
        return "t5xxl"
    if has(r"layers\.0\.self_attn\.q_norm\.weight$"):
        return "qwen3"
    if has(r"layers\.0\.self_attn\.q_proj\.weight$") and has(r"layers\.0\.mlp\.gate_proj\.weight$"):
        return "mistral3"
    return None


def file_text_kind(path: Path) -> Optional[str]:
    return text_kind(header(path))


def find_tokenizer(kind: str, search: list[Path]) -> Path:
    """The tokenizer folder for ``kind`` in ``search`` (``<dir>/<kind>`` or ``<dir>/<ComfyUI path>``);
    ValueError listing where it looked."""
    tried = []
    for root in search:
        for cand in (root / kind, root / TOKENIZER_PATHS[kind]):
            tried.append(cand)
            if (cand / "tokenizer_config.json").is_file() and any(
                    (cand / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
                return cand
    raise ValueError(f"no {KIND_NAMES[kind]} tokenizer found; looked in {', '.join(map(str, tried)) or 'nowhere'}. "
                     f"Give --tokenizers with a ComfyUI checkout (it ships {TOKENIZER_PATHS[kind]}) or a folder "
                     f"holding {kind}/tokenizer_config.json")


def _tokenizer(kind: str, search: list[Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(find_tokenizer(kind, search)), local_files_only=True)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _count(sd, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def build_clip_l(sd: dict, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    s = _shapes(sd)
    hidden = s["embeddings.token_embedding.weight"][1]
    config = CLIPTextConfig(vocab_size=s["embeddings.token_embedding.weight"][0], hidden_size=hidden,
                            intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
                            num_attention_heads=max(1, hidden // 64),
                            max_position_embeddings=s["embeddings.position_embedding.weight"][0],
                            hidden_act="quick_gelu", eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, CLIPTextModel


def build_t5(sd: dict, tokenizer):
    from transformers import T5Config, T5EncoderModel

    s = _shapes(sd)
    d_model = s["shared.weight"][1]
    heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    config = T5Config(vocab_size=s["shared.weight"][0], d_model=d_model, d_kv=64,
                      num_heads=s["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // 64,
                      d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                      num_layers=_count(sd, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=heads[0],
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return config, T5EncoderModel


def build_qwen3(sd: dict, tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    s = _shapes(sd)
    head_dim = s["layers.0.self_attn.q_norm.weight"][0]
    config = Qwen3Config(vocab_size=s["embed_tokens.weight"][0], hidden_size=s["embed_tokens.weight"][1],
                         intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
                         num_hidden_layers=_count(sd, r"layers\.(\d+)\."), head_dim=head_dim,
                         num_attention_heads=s["layers.0.self_attn.q_proj.weight"][0] // head_dim,
                         num_key_value_heads=s["layers.0.self_attn.k_proj.weight"][0] // head_dim,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    return config, Qwen3Model


def build_mistral(sd: dict, tokenizer):
    from transformers import MistralConfig, MistralModel

    s = _shapes(sd)
    config = MistralConfig(vocab_size=s["embed_tokens.weight"][0], hidden_size=s["embed_tokens.weight"][1],
                           intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
                           num_hidden_layers=_count(sd, r"layers\.(\d+)\."), head_dim=MISTRAL_HEAD_DIM,
                           num_attention_heads=s["layers.0.self_attn.q_proj.weight"][0] // MISTRAL_HEAD_DIM,
                           num_key_value_heads=s["layers.0.self_attn.k_proj.weight"][0] // MISTRAL_HEAD_DIM,
                           rope_theta=1e9, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                           pad_token_id=tokenizer.pad_token_id)
    return config, MistralModel


def mistral_tokenizer(path: Path):
    """The tokenizer ComfyUI's Mistral file carries (``tekken_model``: tekken JSON bytes)."""
    import tempfile

    from safetensors import safe_open
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral import MistralConverter

    with safe_open(str(path), framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith("tekken_model")), None)
        if key is None:
            raise ValueError(f"{path} has no tekken_model tensor: a Mistral text encoder file as ComfyUI ships it "
                             "carries its tokenizer; use that file")
        blob = f.get_tensor(key).numpy().tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "tekken.json"
        vocab.write_bytes(blob)
        converted = MistralConverter(vocab_file=str(vocab)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


BUILDERS = {"clip_l": build_clip_l, "t5xxl": build_t5, "qwen3": build_qwen3, "mistral3": build_mistral}


def load_text_model(path: Path, kind: str, tokenizer, *, dtype: torch.dtype, device: torch.device,
                    int8: str = "off"):
    """The transformers model of a text-encoder file (weights in ``dtype`` on ``device``, frozen;
    its linears in int8 as ``int8`` says: ``models.int8``)."""
    found = file_text_kind(path)
    if found != kind:
        raise ValueError(f"{path} is {describe_file(path)}, not a {KIND_NAMES[kind]} text encoder; "
                         f"give the {KIND_NAMES[kind]} file here")
    sd = load_tensors(path, dtype, prefixes=_PREFIXES)
    strip = {"qwen3": "model.", "mistral3": "model.", "clip_l": "text_model."}.get(kind, "")
    sd = {k.removeprefix(strip): v for k, v in sd.items()}
    config, cls = BUILDERS[kind](sd, tokenizer)
    with torch.device("meta"):
        model = cls(config)
    wanted = set(model.state_dict())
    if strip and all(k.startswith(strip) for k in wanted):  # a transformers version that keeps the prefix
        sd = {strip + k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in wanted}  # text_projection, logit_scale, decoder parts: unused
    missing = sorted(k for k in wanted - set(sd) if not k.endswith(("encoder.embed_tokens.weight", "position_ids")))
    if missing:
        raise ValueError(f"{path}: the {KIND_NAMES[kind]} tensors are incomplete (missing {missing[:3]})")
    if "encoder.embed_tokens.weight" in wanted:  # T5 ties the encoder's embedding to ``shared``
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model.load_state_dict(sd, strict=False, assign=True)
    embeddings = getattr(getattr(model, "text_model", model), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "position_ids"):  # a buffer the file need not hold
        n = config.max_position_embeddings
        embeddings.register_buffer("position_ids", torch.arange(n).expand(1, -1), persistent=False)
    if kind in ("qwen3", "mistral3"):  # rotary inverse frequencies are a non-persistent buffer, still on meta
        model.rotary_emb = type(model.rotary_emb)(config=config)
    from . import int8 as int8_mod

    if int8_mod.wanted(int8, model, device):
        n = int8_mod.quantize_linears(model)
        log.info("%s: %d linear layers in int8 (bitsandbytes)", path.name, n)
        model.int8 = True
    return model.to(device).eval().requires_grad_(False)


class Qwen3KleinEncoder:
    """``TextEncoder`` for FLUX.2 Klein: context [512, 3·hidden], no pooled vector."""

    def __init__(self, model, tokenizer, identity: str):
        self._model, self._tok, self.identity = model, tokenizer, identity
        self._reported: set[str] = set()

    def _ids(self, texts: list[str]):
        prompts = [QWEN_TEMPLATE.format(t) for t in texts]
        return self._tok(prompts, padding="max_length", max_length=QWEN_TOKENS, truncation=True, return_tensors="pt")

    def overlong(self, texts: list[str]) -> dict[str, str]:
        full = self._tok([QWEN_TEMPLATE.format(t) for t in texts]).input_ids
        out = {t: f"Qwen3 keeps {QWEN_TOKENS} of its {len(i)} tokens" for t, i in zip(texts, full) if len(i) > QWEN_TOKENS}
        self._reported.update(out)
        return out

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        if self._model is None:
            raise RuntimeError(f"text encoder {self.identity} was released; load it again to encode")
        batch = self._ids(texts)
        device = next(self._model.parameters()).device
        out = self._model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          output_hidden_states=True)
        states = torch.stack([out.hidden_states[i] for i in QWEN_LAYERS], dim=2)  # [B, T, 3, D]
        context = states.flatten(2)
        return [TextEmbedding(c.cpu(), None) for c in context]

    def release(self) -> None:
        self._model = None
        _collect()


class MistralFlux2Encoder:
    """``TextEncoder`` for FLUX.2-dev: context [T, 3·hidden] per caption, no pooled vector."""

    def __init__(self, model, tokenizer, identity: str):
        self._model, self._tok, self.identity = model, tokenizer, identity

    def _ids(self, text: str) -> list[int]:
        return [self._tok.bos_token_id] + self._tok(MISTRAL_TEMPLATE.format(text), add_special_tokens=False).input_ids

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        if self._model is None:
            raise RuntimeError(f"text encoder {self.identity} was released; load it again to encode")
        device = next(self._model.parameters()).device
        out = []
        for text in texts:  # one at a time: no padding tokens in the context
            states = self._model(input_ids=torch.tensor([self._ids(text)], device=device),
                                 output_hidden_states=True).hidden_states
            out.append(TextEmbedding(torch.stack([states[i][0] for i in MISTRAL_LAYERS], dim=1).flatten(1).cpu(), None))
        return out

    def release(self) -> None:
        self._model = None
        _collect()


def load_text_encoder(arch: str, files: dict[str, Path], tokenizer_dirs: list[Path], *, dtype: torch.dtype,
                      device: torch.device, schnell: bool = False, int8: str = "auto"):
    """The ``TextEncoder`` for a FLUX family from its files (``files``: kind → path). ``int8``:
    ``models.int8`` mode; an int8 encoder's captions are cached apart (its identity says so)."""
    from .local import T5_LENGTH_DEV, T5_LENGTH_SCHNELL

    def load(kind: str, tok):
        return load_text_model(files[kind], kind, tok, dtype=dtype, device=device, int8=int8)

    def tag(p: Path, model) -> str:
        return f"{p.name}:{p.stat().st_size}" + (":int8" if getattr(model, "int8", False) else "")

    if arch == "flux1":
        clip_tok, t5_tok = _tokenizer("clip_l", tokenizer_dirs), _tokenizer("t5xxl", tokenizer_dirs)
        clip, t5 = load("clip_l", clip_tok), load("t5xxl", t5_tok)
        length = T5_LENGTH_SCHNELL if schnell else T5_LENGTH_DEV
        return Flux1TextEncoder(clip, clip_tok, t5, t5_tok, max_length=length,
                                identity=f"flux1-files:{tag(files['clip_l'], clip)}:{tag(files['t5xxl'], t5)}:t5-{length}")
    if "mistral3" in files:
        tok = mistral_tokenizer(files["mistral3"])
        model = load("mistral3", tok)
        return MistralFlux2Encoder(model, tok, identity=f"flux2-mistral:{tag(files['mistral3'], model)}")
    tok = _tokenizer("qwen3", tokenizer_dirs)
    model = load("qwen3", tok)
    return Qwen3KleinEncoder(model, tok, identity=f"klein-qwen3:{tag(files['qwen3'], model)}")
