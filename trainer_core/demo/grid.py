"""Sample images from a ``FlowModel`` and lay them out as a labelled PNG grid."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..flow import euler_sample, flux_mu, sampling_sigmas
from ..types import FlowModel, LatentCodec, TextBatch, TextEncoder

log = logging.getLogger(__name__)

LABEL_WIDTH = 72  # px of the left column that holds a row's label
PAD = 2  # px between cells


def default_shift(image_tokens: int) -> float:
    """FLUX's resolution-dependent shift ``e^μ`` (μ from ``flow.flux_mu``), kept in [1, 3].

    At 128 px (64 packed tokens) this is ≈ 1.6; at 1024 px (4096 tokens) e^1.15 ≈ 3.16 → 3.
    """
    return min(3.0, max(1.0, math.exp(flux_mu(image_tokens))))


def _model_place(model: FlowModel) -> tuple[torch.device, torch.dtype]:
    for p in model.module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def sample_images(
    model: FlowModel,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    prompts: list[str],
    *,
    seed: int,
    steps: int = 20,
    size: tuple[int, int] = (128, 128),
    guidance: float = 1.0,
    shift: Optional[float] = None,
    references: Optional[list[torch.Tensor]] = None,
) -> torch.Tensor:
    """Euler-sample one image per prompt: ``[N, 3, H, W]`` float32 in [-1, 1] on the CPU.

    ``size`` is (height, width) in pixels, multiples of ``model.pixel_multiple``. The
    noise depends only on ``seed`` and the shape, so "before" and "after" grids with the
    same seed and prompts start from the same noise. ``shift`` defaults to
    ``default_shift`` of the image's token count. ``references``: clean reference latents
    [1, C, h', w'] each (edit models), used for every prompt.
    """
    if not prompts:
        raise ValueError("sample_images needs at least one prompt")
    height, width = size
    if height % model.pixel_multiple or width % model.pixel_multiple:
        raise ValueError(
            f"sample size {height}×{width} must be a multiple of {model.pixel_multiple} px for this model"
        )
    h, w = height // codec.downscale, width // codec.downscale
    if shift is None:
        shift = default_shift(model.image_tokens((h, w)))
    device, dtype = _model_place(model)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.latent_channels, h, w, generator=g).to(device)
    with torch.no_grad():
        text = TextBatch.collate(text_encoder.encode(prompts)).to(device, dtype)
        refs = [r.to(device).expand(len(prompts), *r.shape[1:]) for r in references or ()]
        kwargs = {"references": refs} if refs else {}
        fn = lambda x, s: model.velocity(x, s, text, guidance, **kwargs)  # noqa: E731
        x0 = euler_sample(fn, noise, sampling_sigmas(steps, shift).to(device))
        pixels = codec.decode(x0)
    return pixels.float().clamp(-1, 1).cpu()


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] → [N, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: Sequence[torch.Tensor], path: Path, labels: Optional[list[str]] = None) -> Path:
    """Write rows of images (each ``[N, 3, H, W]`` in [-1, 1]) as one PNG grid.

    Rows may hold different numbers of images; all images in a row share one size, and a
    row is as tall as its images. ``labels`` (one per row) are drawn in a left column with
    PIL's default font.
    """
    if not rows:
        raise ValueError("save_grid needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"save_grid got {len(labels)} labels for {len(rows)} rows")
    for i, r in enumerate(rows):
        if r.dim() != 4 or r.shape[1] != 3:
            raise ValueError(f"save_grid row {i} must be [N, 3, H, W], got {tuple(r.shape)}")
    left = LABEL_WIDTH if labels else 0
    width = left + max(r.shape[0] * (r.shape[3] + PAD) for r in rows) + PAD
    height = sum(r.shape[2] + PAD for r in rows) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y = PAD
    for i, row in enumerate(rows):
        x = left + PAD
        for img in _to_uint8(row):
            canvas.paste(Image.fromarray(img, "RGB"), (x, y))
            x += img.shape[1] + PAD
        if labels:
            draw.text((4, y + 4), labels[i], fill=(0, 0, 0), font=font)
        y += row.shape[2] + PAD
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    log.info("saved sample grid %s", path)
    return path
