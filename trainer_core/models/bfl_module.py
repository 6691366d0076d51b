"""FLUX.1 / FLUX.2 transformers in the BFL layout, owned by the engine (no ComfyUI needed).

The command line trains from the single files ComfyUI users keep in
``models/diffusion_models`` (``flux1-dev.safetensors``, ``flux2_dev...``, Klein). Their
tensor names are the BFL names (``double_blocks.0.img_attn.qkv.weight``), so this module uses
exactly those names: a file loads with ``load_state_dict(strict=True)``, and a LoRA trained on
it is saved under the names ComfyUI's loader expects. It takes ComfyUI's call signature and
block-replacement hook (``transformer_options["patches_replace"]["dit"][("double_block", i)]``),
so ``bfl_flux.BflFlux`` trains it exactly as it trains ComfyUI's own module.

Architecture (Black Forest Labs' reference code, github.com/black-forest-labs/flux and flux2;
the shapes below are what ComfyUI's ``model_detection`` reads from a file):

==================  =============================  =================================
                    FLUX.1 (dev, schnell)           FLUX.2 (dev, Klein)
==================  =============================  =================================
latent tokens       16 ch, 2×2 patches → 64 wide    128 ch (VAE 2×2 packed), patch 1
RoPE axes / theta   (16, 56, 56) / 10000            (32, 32, 32, 32) / 2000
text ids            all zero                        axis 3 = token index
MLP                 GELU(tanh), ratio 4             SiLU-gated, ratio 3 (first linear 2×)
biases              yes                             none
modulation          per block (img_mod, txt_mod,    shared: double_stream_modulation_img
                    modulation)                     / _txt, single_stream_modulation
pooled vector       vector_in (CLIP-L 768)          none
==================  =============================  =================================

Head dim = sum(axes) = 128 for both (heads = hidden / 128). Timestep and guidance are
σ ∈ (0, 1), embedded as sinusoids of 1000·t (cos first). Shapes: x [B, C, H, W] →
velocity [B, C, H, W]; context [B, T, D_text]; y [B, D_pooled] (FLUX.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ARCH_PARAMS = {
    # arch: (axes_dim, theta, mlp_ratio, gated MLP, biases, global modulation, text-id axes, patch)
    "flux1": ((16, 56, 56), 10000, 4.0, False, True, False, (), 2),
    "flux2": ((32, 32, 32, 32), 2000, 3.0, True, False, True, (3,), 1),
}


@dataclass(frozen=True)
class BflParams:
    arch: str
    in_channels: int  # latent channels (before patching)
    hidden: int
    depth: int
    depth_single: int
    context_in: int
    vec_in: Optional[int]  # pooled-vector width (FLUX.1), None for FLUX.2
    guidance: bool

    @property
    def axes_dim(self) -> tuple[int, ...]:
        return ARCH_PARAMS[self.arch][0]

    @property
    def theta(self) -> int:
        return ARCH_PARAMS[self.arch][1]

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * ARCH_PARAMS[self.arch][2])

    @property
    def gated(self) -> bool:
        return ARCH_PARAMS[self.arch][3]

    @property
    def bias(self) -> bool:
        return ARCH_PARAMS[self.arch][4]

    @property
    def global_modulation(self) -> bool:
        return ARCH_PARAMS[self.arch][5]

    @property
    def text_id_axes(self) -> tuple[int, ...]:
        return ARCH_PARAMS[self.arch][6]

    @property
    def patch(self) -> int:
        return ARCH_PARAMS[self.arch][7]

    @property
    def heads(self) -> int:
        return self.hidden // sum(self.axes_dim)


def params_from_state_dict(shapes: dict[str, tuple[int, ...]], *, name: str = "state dict") -> BflParams:
    """``BflParams`` from tensor shapes (BFL names, no prefix). Raises ValueError naming ``name``."""
    if "img_in.weight" not in shapes or "double_blocks.0.img_attn.qkv.weight" not in shapes:
        raise ValueError(f"{name} is not a FLUX diffusion model in the BFL layout (no img_in / double_blocks)")
    arch = "flux2" if "double_stream_modulation_img.lin.weight" in shapes else "flux1"
    hidden, token_width = shapes["img_in.weight"]
    patch = ARCH_PARAMS[arch][7]
    if hidden % sum(ARCH_PARAMS[arch][0]):
        raise ValueError(f"{name}: hidden size {hidden} is not a multiple of the FLUX head dim 128")

    def count(kind: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(kind + ".")})

    return BflParams(arch=arch, in_channels=token_width // (patch * patch), hidden=hidden,
                     depth=count("double_blocks"), depth_single=count("single_blocks"),
                     context_in=shapes["txt_in.weight"][1],
                     vec_in=shapes["vector_in.in_layer.weight"][1] if "vector_in.in_layer.weight" in shapes else None,
                     guidance="guidance_in.in_layer.weight" in shapes)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of 1000·t (cos half first, as in the BFL reference)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotation matrices [B, 1, L, head_dim/2, 2, 2] (float32) for position ids [B, L, n_axes]."""
    parts = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angle = ids[..., i].double()[..., None] * omega  # [B, L, dim/2]
        cos, sin = torch.cos(angle), torch.sin(angle)
        parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2))
    return torch.cat(parts, dim=-3).float().unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` [B, H, L, D] by ``pe`` (computed in float32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).type_as(x)


def attention(q, k, v, pe) -> torch.Tensor:
    """[B, H, L, D] each → [B, L, H·D] with RoPE on q and k."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class Embedder(nn.Module):
    def __init__(self, d_in: int, d: int, bias: bool):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(d_in, d, bias=bias), nn.Linear(d, d, bias=bias)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), weight=self.scale.to(x.dtype), eps=1e-6)


class Attention(nn.Module):
    def __init__(self, p: BflParams):
        super().__init__()
        self.qkv = nn.Linear(p.hidden, 3 * p.hidden, bias=p.bias)
        self.norm = QKNorm(p.hidden // p.heads)
        self.proj = nn.Linear(p.hidden, p.hidden, bias=p.bias)


class GatedSiLU(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def mlp(p: BflParams) -> nn.Sequential:
    width = p.mlp_hidden
    if p.gated:
        return nn.Sequential(nn.Linear(p.hidden, 2 * width, bias=False), GatedSiLU(), nn.Linear(width, p.hidden, bias=False))
    return nn.Sequential(nn.Linear(p.hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, p.hidden))


class Modulation(nn.Module):
    """``lin(silu(vec))`` in 3 (shift, scale, gate) or 6 chunks, each [B, 1, hidden]."""

    def __init__(self, dim: int, n: int, bias: bool):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=bias)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(self.n, dim=-1)


def _norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _heads(qkv: torch.Tensor, heads: int):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleBlock(nn.Module):
    def __init__(self, p: BflParams):
        super().__init__()
        self.heads = p.heads
        if not p.global_modulation:
            self.img_mod, self.txt_mod = Modulation(p.hidden, 6, True), Modulation(p.hidden, 6, True)
        self.img_attn, self.txt_attn = Attention(p), Attention(p)
        self.img_mlp, self.txt_mlp = mlp(p), mlp(p)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        if hasattr(self, "img_mod"):
            im, tm = self.img_mod(vec), self.txt_mod(vec)
        else:  # FLUX.2: (img modulation, txt modulation) computed once for all blocks
            im, tm = vec
        streams = []
        for x, m, attn in ((txt, tm, self.txt_attn), (img, im, self.img_attn)):
            q, k, v = _heads(attn.qkv((1 + m[1]) * _norm(x) + m[0]), self.heads)
            q, k = attn.norm(q, k, v)
            streams.append((q, k, v))
        q, k, v = (torch.cat([t[i] for t in streams], dim=2) for i in range(3))
        out = attention(q, k, v, pe)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(img_out)
        img = img + im[5] * self.img_mlp((1 + im[4]) * _norm(img) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(txt_out)
        txt = txt + tm[5] * self.txt_mlp((1 + tm[4]) * _norm(txt) + tm[3])
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, p: BflParams):
        super().__init__()
        self.heads, self.hidden, self.mlp_in = p.heads, p.hidden, p.mlp_hidden * (2 if p.gated else 1)
        self.linear1 = nn.Linear(p.hidden, 3 * p.hidden + self.mlp_in, bias=p.bias)
        self.linear2 = nn.Linear(p.hidden + p.mlp_hidden, p.hidden, bias=p.bias)
        self.norm = QKNorm(p.hidden // p.heads)
        self.act = GatedSiLU() if p.gated else nn.GELU(approximate="tanh")
        if not p.global_modulation:
            self.modulation = Modulation(p.hidden, 3, True)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        m = self.modulation(vec) if hasattr(self, "modulation") else vec
        qkv, hidden = self.linear1((1 + m[1]) * _norm(x) + m[0]).split([3 * self.hidden, self.mlp_in], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe), self.act(hidden)], dim=2))
        return x + m[2] * out


class LastLayer(nn.Module):
    def __init__(self, p: BflParams):
        super().__init__()
        self.linear = nn.Linear(p.hidden, p.in_channels * p.patch * p.patch, bias=p.bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.hidden, 2 * p.hidden, bias=p.bias))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear((1 + scale) * _norm(x) + shift)


class BflFluxModule(nn.Module):
    """The FLUX transformer with BFL parameter names and ComfyUI's ``Flux.forward`` signature."""

    def __init__(self, p: BflParams):
        super().__init__()
        self.params = p
        token = p.in_channels * p.patch * p.patch
        self.img_in = nn.Linear(token, p.hidden, bias=p.bias)
        self.time_in = Embedder(256, p.hidden, p.bias)
        if p.vec_in is not None:
            self.vector_in = Embedder(p.vec_in, p.hidden, True)
        if p.guidance:
            self.guidance_in = Embedder(256, p.hidden, p.bias)
        self.txt_in = nn.Linear(p.context_in, p.hidden, bias=p.bias)
        self.double_blocks = nn.ModuleList(DoubleBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(p) for _ in range(p.depth_single))
        self.final_layer = LastLayer(p)
        if p.global_modulation:
            self.double_stream_modulation_img = Modulation(p.hidden, 6, False)
            self.double_stream_modulation_txt = Modulation(p.hidden, 6, False)
            self.single_stream_modulation = Modulation(p.hidden, 3, False)

    def _ids(self, b: int, h: int, w: int, t: int, device) -> torch.Tensor:
        n = len(self.params.axes_dim)
        img = torch.zeros(h, w, n, device=device)
        img[..., 1] = torch.arange(h, device=device)[:, None]
        img[..., 2] = torch.arange(w, device=device)[None, :]
        txt = torch.zeros(t, n, device=device)
        for axis in self.params.text_id_axes:
            txt[:, axis] = torch.arange(t, device=device)
        return torch.cat([txt, img.reshape(h * w, n)]).expand(b, -1, -1)

    def forward(self, x, timestep, context, y=None, guidance=None, transformer_options=None, **_):
        p, opts = self.params, dict(transformer_options or {})
        replace = opts.get("patches_replace", {}).get("dit", {})
        b, c, hh, ww = x.shape
        ps = p.patch
        h, w = hh // ps, ww // ps
        img = self.img_in(x.reshape(b, c, h, ps, w, ps).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * ps * ps))
        vec = self.time_in(timestep_embedding(timestep).to(img.dtype))
        if p.guidance and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        if p.vec_in is not None:
            pooled = y if y is not None else torch.zeros(b, p.vec_in, device=x.device, dtype=img.dtype)
            vec = vec + self.vector_in(pooled[:, : p.vec_in])
        txt = self.txt_in(context)
        pe = rope(self._ids(b, h, w, txt.shape[1], x.device), p.axes_dim, p.theta)
        block_vec = vec
        if p.global_modulation:
            block_vec = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec))
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                out = replace[("double_block", i)]({"img": img, "txt": txt, "vec": block_vec, "pe": pe,
                                                    "attn_mask": None, "transformer_options": opts}, {})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, block_vec, pe)
        seq = torch.cat([txt, img], dim=1)
        single_vec = self.single_stream_modulation(vec) if p.global_modulation else vec
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                seq = replace[("single_block", i)]({"img": seq, "vec": single_vec, "pe": pe, "attn_mask": None,
                                                    "transformer_options": opts}, {})["img"]
            else:
                seq = block(seq, single_vec, pe)
        out = self.final_layer(seq[:, txt.shape[1]:], vec)
        return out.reshape(b, h, w, c, ps, ps).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
