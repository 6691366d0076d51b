"""BflFlux on a small stand-in with ComfyUI's FLUX call signature (no ComfyUI needed).

The stand-in copies what matters from ``comfy.ldm.flux.model.Flux``: the
``forward(x, timestep, context, y, guidance, transformer_options)`` signature, the
``patches_replace["dit"]`` block hook with ``original_block`` closures, and blocks that
LayerNorm their residual input and then update it in place (``img += ...``), which is what
breaks plain autograd. tests/comfyui/test_bridge.py runs the same checks on the real module.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer_core import memory
from trainer_core.config import LoRAConfig
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import CHECKPOINT_MODES, BflFlux
from trainer_core.types import BflSlot, FlowModel, TextBatch

H = 32


def _ln(x):
    return F.layer_norm(x, (x.shape[-1],))


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)


class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_attn, self.txt_attn = Attn(), Attn()
        self.img_mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.txt_mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        q = self.img_attn.qkv(_ln(img))[..., :H] + self.txt_attn.qkv(_ln(txt))[..., :H].mean(1, keepdim=True)
        img += self.img_attn.proj(q) * vec[:, None]
        img += self.img_mlp(_ln(img))
        txt += self.txt_attn.proj(_ln(txt)) * vec[:, None]
        txt += self.txt_mlp(_ln(txt))
        return img, txt


class Single(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(H, 3 * H), nn.Linear(3 * H, H)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        x += self.linear2(F.gelu(self.linear1(_ln(x)))) * vec[:, None]
        return x


class StandIn(nn.Module):
    """ComfyUI-signature FLUX.1-like module: patch 2, 16 latent channels; records its inputs."""

    def __init__(self, channels=16, patch=2, guidance=True):
        super().__init__()
        self.patch, self.seen = patch, {}
        self.img_in = nn.Linear(channels * patch * patch, H)
        self.txt_in = nn.Linear(8, H)
        self.time_in = nn.Linear(1, H)
        self.guidance_in = nn.Linear(1, H) if guidance else None
        self.vector_in = nn.Linear(4, H)
        self.double_blocks = nn.ModuleList([Double(), Double()])
        self.single_blocks = nn.ModuleList([Single(), Single()])
        self.final = nn.Linear(H, channels * patch * patch)

    def forward(self, x, timestep, context, y=None, guidance=None, transformer_options={}):
        self.seen = dict(x=x, timestep=timestep, context=context, y=y, guidance=guidance,
                         patched=bool(transformer_options.get("patches_replace")))
        b, c, h, w = x.shape
        p = self.patch
        img = self.img_in(x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p))
        vec = self.time_in(timestep[:, None].to(img.dtype))
        if guidance is not None:
            vec = vec + self.guidance_in(guidance[:, None])
        if y is not None:
            vec = vec + self.vector_in(y)
        txt = self.txt_in(context)
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                def wrap(args):  # late-binding closure, like ComfyUI's block_wrap
                    return dict(zip(("img", "txt"), block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=None)))
                out = replace[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": None,
                                                     "transformer_options": {}}, {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=None)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                img = replace[("single_block", i)]({"img": img, "vec": vec, "pe": None, "transformer_options": {}},
                                                  {"original_block": None})["img"]
            else:
                img = block(img, vec=vec, pe=None)
        out = self.final(img[:, txt.shape[1]:])
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _model(arch="flux1", seed=0, **kw):
    torch.manual_seed(seed)
    if arch == "flux1":
        return BflFlux(StandIn(), arch="flux1", guidance_embed=True, latent_channels=16, patch_size=2, **kw)
    return BflFlux(StandIn(channels=128, patch=1, guidance=False), arch="flux2", guidance_embed=False,
                   latent_channels=128, patch_size=1, context_tokens=512, **kw)


def _inputs(arch="flux1", b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, hw = (16, 4) if arch == "flux1" else (128, 2)
    x = torch.randn(b, c, hw, hw, generator=g)
    text = TextBatch(torch.randn(b, 5, 8, generator=g), torch.randn(b, 4, generator=g) if arch == "flux1" else None)
    return x, torch.rand(b, generator=g), text, torch.randn(b, c, hw, hw, generator=g)


def test_protocol_and_attributes():
    m1, m2 = _model("flux1"), _model("flux2")
    assert isinstance(m1, FlowModel) and isinstance(m2, FlowModel)
    assert (m1.lora_format, m2.lora_format) == ("flux1_kohya", "flux2_diffusion_model")
    assert m1.pixel_multiple == m2.pixel_multiple == 16
    assert m1.image_tokens((8, 8)) == 16 and m2.image_tokens((4, 4)) == 16
    assert m1.bfl_name("double_blocks.0.img_attn.qkv") == BflSlot("double_blocks.0.img_attn.qkv")
    assert set(m1.default_targets) == {"attention", "all"}


def test_inputs_match_comfyui_sampling():
    m1 = _model("flux1")
    x, sigma, text, _ = _inputs("flux1")
    v = m1.velocity(x, sigma, text, guidance=None)
    seen = m1.module.seen
    assert v.dtype == torch.float32 and v.shape == x.shape
    assert seen["timestep"].dtype == torch.float32 and torch.equal(seen["timestep"], sigma)  # σ itself, not 1000·σ
    assert torch.equal(seen["guidance"], torch.ones(2)) and torch.equal(seen["y"], text.pooled)
    assert seen["context"].shape == (2, 5, 8) and seen["patched"]
    m2 = _model("flux2")
    x, sigma, text, _ = _inputs("flux2")
    m2.velocity(x, sigma, text, guidance=4.0)
    seen = m2.module.seen
    assert seen["guidance"] is None and seen["y"] is None
    assert seen["context"].shape == (2, 512, 8)  # left-padded with zeros like Flux2.extra_conds
    assert torch.equal(seen["context"][:, -5:], text.context) and not seen["context"][:, :-5].any()
    with torch.no_grad():
        m2.velocity(x, sigma, text)
    assert not m2.module.seen["patched"]  # no hook when nothing needs gradients



def test_chroma_is_fed_from_its_family_record():
    """Chroma: T5 context as encoded (no padding), no pooled vector, guidance input always 0
    (what ComfyUI's Chroma.extra_conds passes), kohya files, 16-pixel sides."""
    torch.manual_seed(0)
    m = BflFlux(StandIn(), arch="chroma", guidance_embed=False, latent_channels=16, patch_size=2)
    assert (m.lora_format, m.pixel_multiple, m.family.name) == ("flux1_kohya", 16, "chroma")
    x, sigma, text, _ = _inputs("flux1")
    assert text.pooled is not None
    m.velocity(x, sigma, text, guidance=3.5)
    seen = m.module.seen
    assert seen["y"] is None and torch.equal(seen["guidance"], torch.zeros(2))
    assert torch.equal(seen["context"], text.context)

def test_plain_autograd_fails_but_every_mode_gives_the_same_gradients():
    model = _model("flux1", checkpoint="off")
    x, sigma, text, target = _inputs("flux1")
    net = LoraNetwork.inject(model.module, LoRAConfig(rank=2), model.default_targets["all"])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    plain = model.module(x, sigma, text.context, y=text.pooled, guidance=torch.ones(2))
    with pytest.raises(RuntimeError, match="inplace"):
        F.mse_loss(plain, target).backward()
    grads = {}
    for mode in CHECKPOINT_MODES:
        model.checkpoint = mode
        for p in net.parameters():
            p.grad = None
        F.mse_loss(model.velocity(x, sigma, text, 1.0), target).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert grads["off"].abs().max() > 0
    for mode in CHECKPOINT_MODES:
        assert (grads[mode] - grads["off"]).abs().max() <= 1e-5, mode
    # and it is the true gradient: a float64 central difference along a random direction
    model.module.double()
    model.compute_dtype = torch.float64
    x, target = x.double(), target.double()
    text = TextBatch(text.context.double(), text.pooled.double())
    for p in net.parameters():
        p.grad = None
    F.mse_loss(model.velocity(x, sigma, text, 1.0).double(), target).backward()
    d = [torch.randn_like(p) for p in net.parameters()]
    exact = sum((p.grad * di).sum() for p, di in zip(net.parameters(), d))

    def loss_at(t):
        with torch.no_grad():
            for p, di in zip(net.parameters(), d):
                p.add_(t * di)
            value = F.mse_loss(model.velocity(x, sigma, text, 1.0).double(), target)
            for p, di in zip(net.parameters(), d):
                p.sub_(t * di)
        return value

    numeric = (loss_at(1e-4) - loss_at(-1e-4)) / 2e-4
    assert abs(numeric - exact) <= 1e-3 * abs(exact), (numeric, exact)


def test_prepare_for_training():
    m = _model("flux1")
    m.prepare_for_training(dtype=torch.bfloat16, gradient_checkpointing=False)
    assert m.checkpoint == "off" and m.autocast_dtype == torch.bfloat16
    m.prepare_for_training(dtype=torch.float32, gradient_checkpointing=True)
    assert m.checkpoint == "blocks" and m.autocast_dtype is None
    fixed = _model("flux1", checkpoint="selective", precision_fixed=True)
    fixed.prepare_for_training(dtype=torch.bfloat16, gradient_checkpointing=False)
    assert fixed.checkpoint == "selective" and fixed.autocast_dtype is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="arch"):
        BflFlux(StandIn(), arch="sdxl", guidance_embed=False, latent_channels=16, patch_size=2)
    with pytest.raises(ValueError, match="checkpoint"):
        BflFlux(StandIn(), arch="flux1", guidance_embed=False, latent_channels=16, patch_size=2, checkpoint="all")
    with pytest.raises(ValueError, match="double_blocks"):
        BflFlux(nn.Linear(2, 2), arch="flux1", guidance_embed=False, latent_channels=16, patch_size=2)
    m = _model("flux1")
    x, sigma, text, _ = _inputs("flux1")
    with pytest.raises(ValueError, match="16-channel"):
        m.velocity(torch.zeros(2, 4, 4, 4), sigma, text)


def test_auto_checkpointing_recomputes_only_when_activations_do_not_fit(monkeypatch):
    import trainer_core.models.bfl_flux as bfl

    model = _model("flux1", checkpoint="auto")
    x, sigma, text, target = _inputs("flux1")
    net = LoraNetwork.inject(model.module, LoRAConfig(rank=2), model.default_targets["all"])
    need = model.activation_bytes(2, model.image_tokens(tuple(x.shape[-2:])) + text.context.shape[1])
    tokens = model.image_tokens(tuple(x.shape[-2:])) + text.context.shape[1]
    run = memory.RunShape(batch=2, compute_bytes=4, tokens=tokens)
    assert need == memory.activation_terms(model.memory_shape(), run, "off")[1] > 0
    chosen = {}
    for free, expected in ((need * 2, "off"), (need * 2 - 1, "blocks")):
        model._auto_choices.clear()
        monkeypatch.setattr(bfl, "free_memory", lambda device, free=free: free)
        for p in net.parameters():
            p.grad = None
        F.mse_loss(model.velocity(x, sigma, text, 1.0), target).backward()
        assert model._mode == expected
        chosen[expected] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.allclose(chosen["off"], chosen["blocks"], atol=1e-6)


def test_compile_wraps_each_block_and_keeps_gradients(monkeypatch):
    """train.compile plumbing: one torch.compile per block (never the whole module), the same
    gradients, LoRA and checkpointing untouched. (A real compile takes minutes on a CPU; the
    stand-in compiler records what it was given and runs it eagerly.)"""
    from trainer_core.models.common import resolve_compile

    given = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: given.append(fn) or fn)
    grads = {}
    for enabled in (False, True):
        model = _model("flux1", checkpoint="blocks")
        model.set_compile(enabled)
        net = LoraNetwork.inject(model.module, LoRAConfig(rank=2), model.default_targets["all"])
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(0.1)
        x, sigma, text, target = _inputs("flux1")
        F.mse_loss(model.velocity(x, sigma, text, 1.0), target).backward()
        F.mse_loss(model.velocity(x, sigma, text, 1.0), target).backward()  # compiled once per block
        grads[enabled] = torch.cat([p.grad.flatten() for p in net.parameters()])
        net.remove()
    blocks = list(model.module.double_blocks) + list(model.module.single_blocks)
    given = [g for g in given if isinstance(g, nn.Module)]  # (peft's bitsandbytes import compiles helpers)
    assert len(given) == len(blocks) and {id(g) for g in given} == {id(b) for b in blocks}
    assert torch.equal(grads[True], grads[False])
    assert resolve_compile("auto", torch.device("cpu")) is False and resolve_compile("on", torch.device("cpu")) is True
    assert resolve_compile("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="train.compile"):
        resolve_compile("yes", torch.device("cpu"))


def test_compile_failure_under_auto_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = _model("flux1", checkpoint="off")
    model.set_compile(True, fallback=True)
    x, sigma, text, _ = _inputs("flux1")
    with torch.enable_grad():
        v = model.velocity(x, sigma, text, 1.0)
    assert torch.isfinite(v).all() and not model.compile_blocks
    model.set_compile(True)  # "on": the failure is the user's to see
    with pytest.raises(RuntimeError, match="no compiler"), torch.enable_grad():
        model.velocity(x, sigma, text, 1.0)
