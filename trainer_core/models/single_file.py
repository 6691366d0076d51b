"""Single ``.safetensors`` files as ComfyUI users keep them (never downloads, no ComfyUI).

* diffusion models (``models/diffusion_models``): FLUX.1 dev/schnell, FLUX.2 dev, Klein in the
  BFL layout (optionally under ``model.diffusion_model.``), bf16/fp16/fp32 or fp8 (plain, or
  scaled: ComfyUI's ``weight_scale`` / older ``scale_weight`` + ``scaled_fp8``; dequantized to
  the compute dtype on load) → ``BflFlux`` over the engine's own ``BflFluxModule``;
* VAE files (``models/vae``): FLUX.1 ``ae.safetensors`` (16 latent channels) and the FLUX.2 VAE
  (32 channels, batch-norm statistics; latents 2×2-packed to 128 channels), ldm layout →
  diffusers ``AutoencoderKLFlux2`` (it allows a decoder narrower than the encoder);
* ``describe_file``: what a file looks like (for errors: "a VAE, not a diffusion model").

Text-encoder files are in ``text_files``. What each FLUX family needs is one table,
``FAMILY_FILES``, keyed by the engine's ``arch``.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Optional

import torch

from .bfl_flux import BflFlux
from .bfl_module import BflFluxModule, params_from_state_dict
from .families import FAMILIES

log = logging.getLogger(__name__)

FAMILY_FILES = {
    # arch: (latent channels of the VAE file, text encoders it takes, VAE scale, VAE shift)
    "flux1": (16, ("clip_l", "t5xxl"), 0.3611, 0.1159),
    "flux2": (32, ("qwen3", "mistral3"), 1.0, 0.0),
}
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.")
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_DROPPED = (".comfy_quant", ".input_scale", ".scale_input")


def header(path: str | Path) -> dict:
    """The safetensors header (name → dtype/shape), without ``__metadata__``. Raises
    ValueError naming the file when it is not a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError
            data = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e or 'bad header'})") from None
    data.pop("__metadata__", None)
    return data


def _strip(names, prefixes=PREFIXES) -> str:
    for p in prefixes:
        if any(k.startswith(p) for k in names):
            return p
    return ""


def describe_file(path: str | Path) -> str:
    """What a safetensors file holds, in words ("a FLUX.1 diffusion model", "a CLIP-L text
    encoder", "a LoRA", ...), from its tensor names only."""
    names = set(header(path))
    p = _strip(names)
    names = {k[len(p):] for k in names}
    if "img_in.weight" in names and any(k.startswith("double_blocks.") for k in names):
        return "a FLUX.2 diffusion model" if "double_stream_modulation_img.lin.weight" in names \
            else "a FLUX.1 diffusion model"
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in names):
        return "a LoRA"
    if "decoder.conv_in.weight" in names:
        z = header(path)[p + "decoder.conv_in.weight"]["shape"][1]
        family = {16: "FLUX.1 ", 32: "FLUX.2 "}.get(z, "")
        return f"a {family}VAE ({z} latent channels)"
    from .text_files import KIND_NAMES, text_kind  # text encoders

    kind = text_kind(names)
    if kind:
        return f"a {KIND_NAMES[kind]} text encoder"
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in names):
        return "a diffusers-layout transformer (not the BFL layout ComfyUI's diffusion_models files use)"
    return f"an unrecognised model ({len(names)} tensors, e.g. {sorted(names)[:3]})"


def load_tensors(path: str | Path, dtype: torch.dtype, *, prefixes=PREFIXES) -> dict[str, torch.Tensor]:
    """All tensors of a file, prefix removed, floating ones in ``dtype``; fp8 weights with a
    scale are dequantized (``w·scale``), quantization bookkeeping tensors dropped."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        p = _strip(keys, prefixes)
        scales = {k[: -len(s)]: k for k in keys for s in _SCALE_SUFFIXES if k.endswith(s)}
        for key in keys:
            if not key.startswith(p) or key.endswith(_DROPPED + _SCALE_SUFFIXES) or key.endswith("scaled_fp8"):
                continue
            t = f.get_tensor(key)
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer in scales:
                t = t.float() * f.get_tensor(scales[layer]).float()
            out[key[len(p):]] = t.to(dtype) if t.is_floating_point() else t
    return out


def _expect(path: Path, wanted: str, looks: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{path} is {looks}, not {wanted}; give {wanted} file here")


def load_diffusion_model(path: str | Path, *, dtype: torch.dtype, device: torch.device) -> BflFlux:
    """A BFL-layout FLUX file → ``BflFlux`` (weights in ``dtype`` on ``device``, frozen)."""
    path = Path(path)
    looks = describe_file(path)
    _expect(path, "a FLUX diffusion model (models/diffusion_models)", looks, "diffusion model" in looks
            and "diffusers" not in looks)
    sd = load_tensors(path, dtype)
    params = params_from_state_dict({k: tuple(v.shape) for k, v in sd.items()}, name=str(path))
    with torch.device("meta"):
        module = BflFluxModule(params)
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not fit a {params.arch} model of this shape "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    module = module.to(device).requires_grad_(False).eval()
    log.info("%s: %s, %d+%d blocks, hidden %d, guidance %s", path.name, params.arch, params.depth,
             params.depth_single, params.hidden, params.guidance)
    return BflFlux(module, arch=params.arch, guidance_embed=params.guidance, latent_channels=params.in_channels,
                   patch_size=params.patch, context_tokens=FAMILIES.get(params.arch).context_tokens,
                   compute_dtype=dtype)


class FluxVaeCodec:
    """``LatentCodec`` over a FLUX VAE file (diffusers ``AutoencoderKLFlux2``), with the
    latent conventions of ComfyUI's VAE loader:

    * FLUX.1: posterior mean, then ``(z - 0.1159)·0.3611`` (``comfy.latent_formats.Flux``);
    * FLUX.2: posterior mean, 2×2 patches packed into channels (``c·4 + dy·2 + dx``), then
      normalised with the file's batch-norm running mean/var (eps 1e-4) → 128 channels at /16.
    """

    def __init__(self, vae: torch.nn.Module, arch: str, identity: str):
        self._vae, self.arch, self.identity = vae, arch, identity
        z, _, self.scale, self.shift = FAMILY_FILES[arch]
        self.packed = arch == "flux2"
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1) * (2 if self.packed else 1)
        self.latent_channels = z * (4 if self.packed else 1)

    def _vae_or_raise(self):
        if self._vae is None:
            raise RuntimeError(f"VAE codec {self.identity} was released; load the VAE again to encode/decode")
        return self._vae

    def _stats(self, z):
        bn = self._vae.bn
        return (bn.running_mean.view(1, -1, 1, 1).to(z), torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(z) + 1e-4))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self._vae_or_raise()
        p = next(vae.parameters())
        z = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mode().float()
        if self.packed:
            b, c, h, w = z.shape
            z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
            mean, std = self._stats(z)
            return ((z - mean) / std).to(pixels.device)
        return ((z - self.shift) * self.scale).to(pixels.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._vae_or_raise()
        p = next(vae.parameters())
        z = latents.float().to(p.device)
        if self.packed:
            mean, std = self._stats(z)
            z = z * std + mean
            b, c4, h, w = z.shape
            z = z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)
        else:
            z = z / self.scale + self.shift
        return vae.decode(z.to(p.dtype)).sample.float().clamp(-1, 1).to(latents.device)

    def release(self) -> None:
        from .local import _collect

        self._vae = None
        _collect()


def load_vae(path: str | Path, *, dtype: torch.dtype, device: torch.device, arch: Optional[str] = None) -> FluxVaeCodec:
    """A FLUX.1 / FLUX.2 VAE file → ``FluxVaeCodec``; ``arch``: the diffusion model's, checked."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    looks = describe_file(path)
    _expect(path, "a VAE (models/vae)", looks, "VAE" in looks)
    sd = load_tensors(path, torch.float32)
    sd = {k.replace("decoder.post_quant_conv.", "post_quant_conv.").replace("encoder.quant_conv.", "quant_conv."): v
          for k, v in sd.items()}
    z = sd["decoder.conv_in.weight"].shape[1]
    found = next((a for a, spec in FAMILY_FILES.items() if spec[0] == z), None)
    if found is None or (found == "flux2") != ("bn.running_mean" in sd):
        raise ValueError(f"{path}: a VAE with {z} latent channels is neither the FLUX.1 ae (16) nor the FLUX.2 VAE "
                         "(32, with batch-norm statistics)")
    if arch is not None and found != arch:
        raise ValueError(f"{path} is the {found} VAE but the diffusion model is {arch}; choose the {arch} VAE")
    levels = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    enc = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    dec = tuple(sd[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    vae = AutoencoderKLFlux2(block_out_channels=enc, decoder_block_out_channels=dec, layers_per_block=layers,
                             latent_channels=z, use_quant_conv="quant_conv.weight" in sd,
                             use_post_quant_conv="post_quant_conv.weight" in sd,
                             down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels)
    converted = convert_ldm_vae_checkpoint(sd, dict(vae.config))
    converted.update({k: v for k, v in sd.items() if k.startswith("bn.")})
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.startswith("bn.")]  # FLUX.1's ae has no latent statistics
    if missing or unexpected:
        raise ValueError(f"{path}: VAE tensors do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return FluxVaeCodec(vae, found, identity=f"vae-file:{path.name}:{path.stat().st_size}")
