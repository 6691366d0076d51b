"""Load a real FLUX.1 model from a local diffusers-format folder (never downloads).

The folder is what ``FluxPipeline.save_pretrained`` writes (or a hub snapshot of
black-forest-labs/FLUX.1-dev or -schnell):

    transformer/     FluxTransformer2DModel
    vae/             AutoencoderKL (16 latent channels)
    text_encoder/    CLIPTextModel (CLIP-L, pooled vector)
    text_encoder_2/  T5EncoderModel (T5-XXL, per-token context)
    tokenizer/       CLIP tokenizer
    tokenizer_2/     T5 tokenizer

Text conditioning follows ``FluxPipeline.encode_prompt``: CLIP ``pooler_output`` with the
prompt padded to the CLIP length, T5 ``last_hidden_state`` padded to 512 tokens for dev
(guidance-distilled) or 256 for schnell.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..types import TextEmbedding
from .diffusers_flux import DiffusersFlux1

log = logging.getLogger(__name__)

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
FLUX1_CLASS = "FluxTransformer2DModel"
T5_LENGTH_DEV = 512
T5_LENGTH_SCHNELL = 256


def _collect() -> None:
    """Reclaim memory after the last reference to a model was dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_flux1_folder(path: str | Path) -> dict:
    """Validate the folder layout; return ``transformer/config.json`` as a dict."""
    root = Path(path)
    if not root.exists():
        raise ValueError(
            f"FLUX.1 model folder {root} does not exist; give the path of a diffusers-format folder"
        )
    if not root.is_dir():
        raise ValueError(
            f"{root} is a file; expected a diffusers-format FLUX.1 folder with subfolders "
            f"{', '.join(SUBFOLDERS)}"
        )
    missing = [name for name in SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise ValueError(
            f"FLUX.1 folder {root} is missing the subfolder(s) {', '.join(missing)}; "
            f"a diffusers FLUX.1 folder has {', '.join(SUBFOLDERS)}"
        )
    config_file = root / "transformer" / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} is missing; the transformer subfolder is not a diffusers model")
    config = json.loads(config_file.read_text())
    found = config.get("_class_name", "<no _class_name>")
    if found != FLUX1_CLASS:
        raise ValueError(
            f"{config_file} describes a {found}, not a FLUX.1 transformer ({FLUX1_CLASS}); "
            "choose a FLUX.1-dev or FLUX.1-schnell folder"
        )
    return config


def _config_hash(config: Any) -> str:
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class DiffusersVaeCodec:
    """``LatentCodec`` over a diffusers ``AutoencoderKL``.

    encode: the posterior mean (deterministic; ``latent_dist.mode()``), then
    ``(z - shift_factor)·scaling_factor`` from the VAE config (FLUX.1: 0.1159, 0.3611).
    decode: ``z/scaling_factor + shift_factor`` → VAE decoder, clamped to [-1, 1].
    Outputs are float32 on the input's device.
    """

    def __init__(self, vae: torch.nn.Module, identity: str):
        self._vae = vae
        self.identity = identity
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)

    def _vae_or_raise(self) -> torch.nn.Module:
        if self._vae is None:
            raise RuntimeError(
                f"VAE codec {self.identity} was released; load the model again to encode/decode"
            )
        return self._vae

    def _place(self) -> tuple[torch.device, torch.dtype]:
        p = next(self._vae_or_raise().parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        device, dtype = self._place()
        z = self._vae.encode(pixels.to(device, dtype)).latent_dist.mode()
        return ((z.float() - self.shift) * self.scale).to(pixels.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        device, dtype = self._place()
        z = latents.float() / self.scale + self.shift
        pixels = self._vae.decode(z.to(device, dtype)).sample
        return pixels.float().clamp(-1, 1).to(latents.device)

    def release(self) -> None:
        """Drop the VAE weights (after latents are cached); encode/decode then raise."""
        self._vae = None
        _collect()


class Flux1TextEncoder:
    """``TextEncoder``: CLIP-L pooled vector [768] + T5 context [max_length, 4096].

    Embeddings come back on the CPU in the encoders' dtype (they are cached, not trained).
    """

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, *, max_length: int, identity: str):
        self._clip, self._clip_tok = clip, clip_tokenizer
        self._t5, self._t5_tok = t5, t5_tokenizer
        self.max_length = max_length
        self.clip_length = min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings)
        self.identity = identity
        self._reported: set[str] = set()

    def _tokens(self, tokenizer, texts: list[str], length: int, name: str) -> torch.Tensor:
        ids = tokenizer(
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        for text, why in self._overflow(tokenizer, texts, length, name).items():
            if text not in self._reported:  # dataset captions were reported with their file (``overlong``)
                log.warning("%s: %r", why, text)
        return ids

    @staticmethod
    def _overflow(tokenizer, texts: list[str], length: int, name: str) -> dict[str, str]:
        full = tokenizer(texts, padding=False, truncation=False).input_ids
        return {t: f"{name} keeps {length} of its {len(ids)} tokens" for t, ids in zip(texts, full) if len(ids) > length}

    def overlong(self, texts: list[str]) -> dict[str, str]:
        """text → what is cut off, for each text longer than CLIP's or T5's token limit
        (the caller names the caption files; ``encode`` then does not warn again)."""
        out = self._overflow(self._clip_tok, texts, self.clip_length, "CLIP")
        for text, why in self._overflow(self._t5_tok, texts, self.max_length, "T5").items():
            out[text] = f"{out[text]}, {why}" if text in out else why
        self._reported.update(out)
        return out

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        if self._clip is None:
            raise RuntimeError(f"text encoder {self.identity} was released; load the model again to encode")
        clip_ids = self._tokens(self._clip_tok, texts, self.clip_length, "CLIP")
        t5_ids = self._tokens(self._t5_tok, texts, self.max_length, "T5")
        clip_device = next(self._clip.parameters()).device
        t5_device = next(self._t5.parameters()).device
        pooled = self._clip(clip_ids.to(clip_device), output_hidden_states=False).pooler_output
        context = self._t5(t5_ids.to(t5_device), output_hidden_states=False).last_hidden_state
        return [TextEmbedding(c.cpu(), p.cpu()) for c, p in zip(context, pooled)]

    def release(self) -> None:
        """Drop both encoders (after embeddings are cached); encode then raises."""
        self._clip = self._t5 = None
        _collect()


BASE_QUANTIZATIONS = ("none", "int8", "nf4")


def bnb_quantization_config(kind: str, *, dtype: torch.dtype, device: str | torch.device):
    """diffusers' ``BitsAndBytesConfig`` for ``train.base_quantization`` (None for "none").
    Raises ValueError, naming the setting and the fix, where bitsandbytes cannot run: diffusers
    quantizes with bitsandbytes only onto a CUDA GPU, and bitsandbytes must be installed."""
    if kind not in BASE_QUANTIZATIONS:
        raise ValueError(f"train.base_quantization={kind!r}; expected one of {list(BASE_QUANTIZATIONS)}")
    if kind == "none":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"train.base_quantization={kind!r} needs a CUDA GPU: diffusers loads bitsandbytes-quantized models "
            f"only onto a GPU, and this run is on {device.type}; set train.base_quantization=none"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"train.base_quantization={kind!r} needs bitsandbytes: pip install bitsandbytes, "
                         "or set train.base_quantization=none") from None
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_diffusers_flux_folder(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    base_quantization: str = "none",
) -> tuple[DiffusersFlux1, DiffusersVaeCodec, Flux1TextEncoder]:
    """Load transformer, VAE and text encoders from local files only, all in ``dtype`` on
    ``device``; with ``base_quantization`` "int8"/"nf4" the transformer's linears are
    bitsandbytes-quantized while loading (``bnb_quantization_config``). Raises ValueError for a
    missing folder, a missing subfolder (named), a transformer that is not FLUX.1 (the class
    found is named) or a quantization the device cannot run (before anything is loaded)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(path).expanduser().resolve()
    config = check_flux1_folder(root)
    quantization = bnb_quantization_config(base_quantization, dtype=dtype, device=device)
    schnell = not config.get("guidance_embeds", False)
    log.info("loading FLUX.1-%s from %s (%s, base weights %s)", "schnell" if schnell else "dev", root, dtype,
             base_quantization)

    if quantization is None:
        transformer = FluxTransformer2DModel.from_pretrained(
            str(root), subfolder="transformer", torch_dtype=dtype, local_files_only=True
        ).to(device)
    else:  # bitsandbytes places the quantized weights on the GPU itself; .to() is refused
        transformer = FluxTransformer2DModel.from_pretrained(
            str(root), subfolder="transformer", torch_dtype=dtype, local_files_only=True,
            quantization_config=quantization,
        )
    transformer.requires_grad_(False)
    model = DiffusersFlux1(transformer, gradient_checkpointing=gradient_checkpointing)

    vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype, local_files_only=True)
    vae = vae.to(device).eval().requires_grad_(False)
    if vae.config.latent_channels != model.latent_channels:
        raise ValueError(
            f"{root / 'vae'} has {vae.config.latent_channels} latent channels but the transformer "
            f"expects {model.latent_channels}; the VAE does not belong to this FLUX.1 model"
        )
    codec = DiffusersVaeCodec(vae, identity=f"diffusers-vae:{root}:{_config_hash(vae.config)}")

    def text_model(cls, name: str):
        m = cls.from_pretrained(str(root / name), dtype=dtype, local_files_only=True)
        return m.to(device).eval().requires_grad_(False)

    max_length = T5_LENGTH_SCHNELL if schnell else T5_LENGTH_DEV
    text = Flux1TextEncoder(
        text_model(CLIPTextModel, "text_encoder"),
        AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
        text_model(T5EncoderModel, "text_encoder_2"),
        AutoTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True),
        max_length=max_length,
        identity=f"flux1-clip-t5:{root}:t5-{max_length}",
    )
    return model, codec, text

