"""ComfyUI's VAE, CLIP and CONDITIONING → the engine's ``LatentCodec`` and ``TextEncoder``."""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from trainer_core.fingerprint import tensor_fingerprint
from trainer_core.models.families import FAMILIES
from trainer_core.types import TextEmbedding


def weights_identity(state_dict: dict) -> str:
    """A short digest of a module's weights (names, shapes, dtypes, sampled values)."""
    return tensor_fingerprint(sorted(state_dict.items()))


class VaeCodec:
    """``LatentCodec`` over a ComfyUI VAE and the MODEL's latent format.

    ``encode``: pixels [B, 3, H, W] in [-1, 1] → ``vae.encode`` ([B, H, W, 3] in [0, 1]) →
    ``process_latent_in`` (FLUX.1: (z - 0.1159)·0.3611; FLUX.2: identity, its VAE already
    returns 128 batch-normed channels at /16). ``decode`` is the inverse."""

    def __init__(self, vae, model_patcher):
        self.vae = vae
        self.base = model_patcher.model
        self.downscale = int(vae.spacial_compression_encode())
        fmt = type(self.base.latent_format).__name__
        self.identity = f"comfy-vae-{weights_identity(vae.get_sd())}-{fmt}"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"VaeCodec.encode expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        images = ((pixels.float().clamp(-1, 1) + 1) / 2).movedim(1, -1)
        with torch.inference_mode():
            latents = self.vae.encode(images)
            out = self.base.process_latent_in(latents)
        return out.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            images = self.vae.decode(self.base.process_latent_out(latents.float()))
        return (images.float().movedim(-1, 1) * 2 - 1).clone()

    def release(self) -> None:
        self.vae = None


# ---------------------------------------------------------------------- text
def _cond_embedding(cond: torch.Tensor, extras: dict, keep_pooled: bool) -> TextEmbedding:
    pooled = extras.get("pooled_output") if keep_pooled else None
    return TextEmbedding(
        context=cond[0].detach().float().cpu().clone(),
        pooled=None if pooled is None else pooled.reshape(-1).detach().float().cpu().clone(),
    )


class ClipTextEncoder:
    """``TextEncoder`` over a ComfyUI CLIP: each caption through ``clip.tokenize`` and
    ``clip.encode_from_tokens(..., return_pooled=True, return_dict=True)``. The pooled vector
    is kept only for a family that takes one (``Family.pooled``: FLUX.1; else ``pooled`` None)."""

    def __init__(self, clip, arch):
        arch = getattr(arch, "arch", arch)  # an ArchInfo or its arch string
        self.family = FAMILIES.get(arch)  # an unknown name raises, listing the families
        self.clip, self.arch = clip, arch
        names = f"{type(clip).__name__}/{type(clip.cond_stage_model).__name__}"
        self.identity = f"comfy-clip-{names}-{weights_identity(clip.cond_stage_model.state_dict())}-{arch}"

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        if self.clip is None:
            raise RuntimeError("this ClipTextEncoder was released; captions must be encoded before release()")
        out = []
        with torch.inference_mode():
            for text in texts:
                enc = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True, return_dict=True)
                out.append(_cond_embedding(enc["cond"], enc, keep_pooled=self.family.pooled))
        return out

    def release(self) -> None:
        self.clip = None


class FixedConditioningEncoder:
    """``TextEncoder`` that returns a fixed ComfyUI CONDITIONING (``[[cond [1, T, D],
    {"pooled_output": [1, P]}], ...]``; the first entry is used) for every caption: captions
    are IGNORED. ``select(caption)`` may return "class" to use ``class_conditioning``
    instead (e.g. captions without the trigger word); default: always "main"."""

    def __init__(self, conditioning, class_conditioning=None, select: Optional[Callable[[str], str]] = None):
        self.main = self._first(conditioning, "conditioning")
        self.cls = None if class_conditioning is None else self._first(class_conditioning, "class_conditioning")
        self.select = select or (lambda text: "main")
        h = hashlib.sha256()
        for emb in (self.main, self.cls):
            if emb is None:
                h.update(b"none")
                continue
            for t in (emb.context, emb.pooled):
                h.update(b"-" if t is None else f"{tuple(t.shape)}".encode() + t.numpy().tobytes())
        self.identity = f"comfy-cond-{h.hexdigest()[:16]}"

    @staticmethod
    def _first(conditioning, name: str) -> TextEmbedding:
        try:
            cond, extras = conditioning[0][0], conditioning[0][1]
        except (TypeError, IndexError, KeyError):
            raise ValueError(f"{name} is not a ComfyUI CONDITIONING ([[tensor, dict], ...])") from None
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
            raise ValueError(f"{name}[0][0] must be a [1, T, D] tensor, got {getattr(cond, 'shape', type(cond))}")
        return _cond_embedding(cond, extras, keep_pooled=True)

    def encode(self, texts: list[str]) -> list[TextEmbedding]:
        out = []
        for text in texts:
            which = self.select(text)
            if which not in ("main", "class"):
                raise ValueError(f"select({text!r}) returned {which!r}; expected 'main' or 'class'")
            if which == "class" and self.cls is None:
                raise ValueError("select() chose 'class' but no class_conditioning was given")
            out.append(self.main if which == "main" else self.cls)
        return out

    def release(self) -> None:
        pass
