"""Peak accelerator memory of a LoRA training step, from shapes alone (no model needed).

``estimate(shape, run, checkpoint=..., streamed=...)`` returns the bytes a step needs on
the compute device, by component:

* ``resident_weights``: every weight outside the streamed blocks (``ModelShape`` byte sizes,
  so fp8 or quantized weights count as stored);
* ``stream_buffers``: compute copies of streamed blocks in flight: ``STREAM_SLOTS`` blocks
  (the one computing and the one being prefetched, ``trainer_core.streaming``);
* ``lora``: LoRA weights + gradients + optimizer state (``OPTIMIZER_STATE_BYTES``);
* ``activations``: what autograd keeps after the forward (``kept``) plus, with block
  checkpointing, one block's full set while it is recomputed in backward;
* ``cast_weights``: weights that ComfyUI's layers cast per forward (fp8 storage, manual
  cast) are saved by autograd in the compute dtype: all blocks without checkpointing, one
  block with it;
* ``workspace``: gradient buffers and kernel scratch of the backward in flight.

Activations kept per block are ``(c·e_c + f·4)·T·H`` bytes for T tokens, hidden size H,
compute dtype of e_c bytes, plus the LoRA layers' own ``(in + r)·t`` elements per targeted
Linear (t = the tokens it sees) in the compute dtype (the LoRA branch runs in the compute
dtype: ``lora.network``). The coefficients c, f (``_KEPT``) were
measured with ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage) on
ComfyUI's own FLUX.1 / FLUX.2 blocks with PyTorch SDPA attention; FLUX.1-dev/schnell share
FLUX.1's block layout and Klein 4B/9B share FLUX.2-dev's, so they hold for every size.
``tests/comfyui/test_memory_measured.py`` re-measures them (within 15 %).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

GiB = 2**30
HEAD_DIM = 128
STREAM_SLOTS = 2  # streamed blocks on the device at once: computing + prefetching
CHECKPOINT_MODES = ("off", "blocks", "selective")

# Optimizer state in bytes per trainable (fp32) parameter.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0, "adamw8bit": 2.0, "lion8bit": 1.0, "prodigy": 16.0, "adafactor": 0.5,
    "adamw_schedulefree": 8.0,
}
DEFAULT_STATE_BYTES = 8.0

# Kept per block and token in units of H elements: (compute dtype, float32), LoRA excluded.
_KEPT = {
    ("flux1", "double", "off"): (12.25, 1.0), ("flux1", "single", "off"): (7.0, 4.0),
    ("flux2", "double", "off"): (17.0, 1.0), ("flux2", "single", "off"): (12.0, 4.0),
    ("flux1", "double", "selective"): (11.2, 0.1), ("flux1", "single", "selective"): (10.0, 0.1),
    ("flux2", "double", "selective"): (13.0, 0.1), ("flux2", "single", "selective"): (12.0, 0.1),
}
# Selective checkpointing also keeps some LoRA matmul outputs: extra H-units in the LoRA dtype.
_SELECTIVE_LORA = {("flux1", "double", "attention"): 2.0, ("flux1", "double", "all"): 2.0, ("flux1", "single"): 2.0,
                   ("flux2", "double", "attention"): 2.0, ("flux2", "double", "all"): 5.0, ("flux2", "single"): 5.0}


@dataclass(frozen=True)
class LinearShape:
    """One Linear of a block: ``name`` relative to the block, ``per_token``: it runs on
    every token of its stream (False for modulation, which runs once per sample)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = True
    per_token: bool = True

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a FLUX transformer."""

    name: str
    arch: str  # block layout (``Family.memory_layout``): "flux1" | "flux2"
    hidden: int
    double_blocks: int
    single_blocks: int
    double_linears: tuple[LinearShape, ...]
    single_linears: tuple[LinearShape, ...]
    double_block_bytes: int  # stored bytes of one block (weights of any dtype)
    single_block_bytes: int
    other_bytes: int  # weights outside the blocks
    weight_bytes: float = 2.0  # bytes per stored weight element (bf16 2, fp8 1)
    text_tokens: int = 256  # ComfyUI pads T5 to 256 (FLUX.1), Qwen/Mistral to 512 (FLUX.2)
    tokens_per_pixel: float = 1 / 256  # image tokens per pixel (16×16 pixels per token)

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @property
    def total_bytes(self) -> int:
        return self.double_blocks * self.double_block_bytes + self.single_blocks * self.single_block_bytes + self.other_bytes

    def block_names(self) -> list[str]:
        """Blocks in execution order: ``double_blocks.i`` then ``single_blocks.j``."""
        return [f"double_blocks.{i}" for i in range(self.double_blocks)] + \
               [f"single_blocks.{j}" for j in range(self.single_blocks)]

    def block_bytes(self, name: str) -> int:
        return self.double_block_bytes if name.startswith("double") else self.single_block_bytes

    def image_tokens(self, resolution: int) -> int:
        return int(resolution * resolution * self.tokens_per_pixel)


@dataclass(frozen=True)
class RunShape:
    """What one training step looks like: the largest resolution (side of a square of equal
    area), batch, LoRA rank/targets/dtype, optimizer, compute dtype, and whether the layers
    cast stored weights to the compute dtype per forward (fp8 / manual cast)."""

    resolution: int = 512
    batch: int = 1
    rank: int = 16
    targets: str = "attention"  # "attention" | "all" | a regex on block-relative names
    lora_bytes: int = 4
    optimizer: str = "adamw"
    compute_bytes: int = 2
    casts_weights: bool = False
    tokens: Optional[int] = None  # image + text tokens per sample, instead of resolution + shape.text_tokens
    references: int = 0  # reference images per sample (edit LoRAs), each as many tokens as the target

    def replace(self, **kw) -> "RunShape":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes on the compute device, by component."""

    resident_weights: int
    stream_buffers: int
    lora: int
    activations: int
    cast_weights: int
    workspace: int
    activations_kept: int  # part of ``activations``: held from the forward until backward

    @property
    def total(self) -> int:
        return (self.resident_weights + self.stream_buffers + self.lora + self.activations + self.cast_weights
                + self.workspace)

    def components(self) -> dict[str, int]:
        return {"resident weights": self.resident_weights, "streamed-block buffers": self.stream_buffers,
                "LoRA + grads + optimizer": self.lora, "activations": self.activations,
                "cast weights": self.cast_weights, "workspace": self.workspace}

    def table(self) -> str:
        rows = [f"  {k:<26} {v / GiB:8.2f} GB" for k, v in self.components().items()]
        return "\n".join(rows + [f"  {'total (peak)':<26} {self.total / GiB:8.2f} GB"])


# ---------------------------------------------------------------------------- targets
_TARGET_PRESETS = {
    "attention": {"double": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"),
                  "single": ("linear1", "linear2")},
    "all": {"double": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj",
                       "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
            "single": ("linear1", "linear2")},
}


def targeted(shape: ModelShape, kind: str, targets: str) -> list[LinearShape]:
    """The block's Linears a LoRA with ``targets`` (preset name or regex) trains."""
    import re

    linears = shape.double_linears if kind == "double" else shape.single_linears
    preset = _TARGET_PRESETS.get(targets)
    if preset is not None:
        return [lin for lin in linears if lin.name in preset[kind]]
    pattern = re.compile(targets)
    prefix = "double_blocks.0." if kind == "double" else "single_blocks.0."
    return [lin for lin in linears if pattern.fullmatch(prefix + lin.name) or pattern.fullmatch(lin.name)]


def lora_params(shape: ModelShape, run: RunShape) -> int:
    per = {k: sum(run.rank * (lin.in_features + lin.out_features) for lin in targeted(shape, k, run.targets))
           for k in ("double", "single")}
    return shape.double_blocks * per["double"] + shape.single_blocks * per["single"]


# ---------------------------------------------------------------------------- activations
def _tokens(shape: ModelShape, run: RunShape) -> int:
    if run.tokens is not None:
        return run.tokens
    return shape.image_tokens(run.resolution) * (1 + run.references) + shape.text_tokens


def block_activation_bytes(shape: ModelShape, run: RunShape, kind: str, mode: str) -> int:
    """Bytes one block keeps for backward when run without recompute (``off``) or under
    selective checkpointing, for a batch of ``run.batch``."""
    tokens = _tokens(shape, run) * run.batch
    c, f = _KEPT[(shape.arch, kind, "selective" if mode == "selective" else "off")]
    base = (c * run.compute_bytes + f * 4) * tokens * shape.hidden
    lora_elems = sum(lin.in_features + run.rank for lin in targeted(shape, kind, run.targets) if lin.per_token)
    if mode == "selective":
        key = (shape.arch, kind) if kind == "single" else (shape.arch, kind, "attention" if run.targets == "attention" else "all")
        lora_elems += _SELECTIVE_LORA[key] * shape.hidden
    # per_token Linears of a double block see their own stream (img or txt): per token of
    # the joint sequence that is half the img+txt pairs; sum over both streams = per token.
    if kind == "double":
        lora_elems /= 2
    return int(base + lora_elems * tokens * run.compute_bytes)


def activation_terms(shape: ModelShape, run: RunShape, mode: str) -> tuple[int, int]:
    """(kept after the forward, peak during backward) activation bytes for ``mode``."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint mode {mode!r}; expected one of {CHECKPOINT_MODES}")
    tokens = _tokens(shape, run) * run.batch
    outside = tokens * (shape.hidden * run.compute_bytes + 2 * HEAD_DIM * 4)  # final layer input, RoPE table
    per = {k: block_activation_bytes(shape, run, k, "off" if mode == "blocks" else mode) for k in ("double", "single")}
    if mode == "blocks":
        kept = outside + shape.blocks * tokens * shape.hidden * run.compute_bytes  # each block's input
        return kept, kept + max(per.values())  # one block recomputed at a time
    kept = outside + shape.double_blocks * per["double"] + shape.single_blocks * per["single"]
    if mode == "selective":
        full = {k: block_activation_bytes(shape, run, k, "off") for k in per}
        return kept, kept + max(full.values())
    return kept, kept


def estimate(shape: ModelShape, run: RunShape, *, checkpoint: str = "blocks",
             streamed: tuple[str, ...] = ()) -> Estimate:
    """Peak device bytes of one training step with ``checkpoint`` mode and the named blocks
    streamed (the rest of the model resident)."""
    streamed_bytes = sum(shape.block_bytes(n) for n in streamed)
    resident = shape.total_bytes - streamed_bytes
    biggest = sorted((shape.block_bytes(n) for n in streamed), reverse=True)[:STREAM_SLOTS]
    n_lora = lora_params(shape, run)
    lora = int(n_lora * (2 * run.lora_bytes + OPTIMIZER_STATE_BYTES.get(run.optimizer, DEFAULT_STATE_BYTES)))
    kept, peak = activation_terms(shape, run, checkpoint)
    cast = 0
    if run.casts_weights:
        per_elem = run.compute_bytes / shape.weight_bytes
        if checkpoint == "off":
            cast = int((shape.total_bytes - shape.other_bytes) * per_elem)
        else:
            cast = int(max(shape.double_block_bytes, shape.single_block_bytes) * per_elem)
    widest = max([lin.out_features for lin in shape.double_linears + shape.single_linears if lin.per_token]
                 + [shape.hidden])
    tokens = _tokens(shape, run) * run.batch
    workspace = tokens * (widest + 2 * shape.hidden) * run.compute_bytes + 64 * 2**20  # output grads in flight
    return Estimate(resident_weights=resident, stream_buffers=sum(biggest), lora=lora, activations=peak,
                    cast_weights=cast, workspace=workspace, activations_kept=kept)


# ---------------------------------------------------------------------------- shapes
def memory_layout(arch: str) -> tuple[str, int]:
    """(block layout "flux1" | "flux2", typical text tokens) of a family name (``models.families``)."""
    from .models.families import FAMILIES

    fam = FAMILIES.get(arch)  # an unknown name raises, listing the families
    return fam.memory_layout, fam.text_tokens


def _flux_linears(arch: str, hidden: int) -> tuple[tuple[LinearShape, ...], tuple[LinearShape, ...]]:
    h, v1 = hidden, arch == "flux1"
    bias = v1
    mlp_in, mlp_out = (4 * h, 4 * h) if v1 else (6 * h, 3 * h)  # FLUX.2: gated SiLU, 3·H wide
    double = []
    for s in ("img", "txt"):
        if v1:
            double.append(LinearShape(f"{s}_mod.lin", h, 6 * h, True, per_token=False))
        double += [LinearShape(f"{s}_attn.qkv", h, 3 * h, bias), LinearShape(f"{s}_attn.proj", h, h, bias),
                   LinearShape(f"{s}_mlp.0", h, mlp_in, bias), LinearShape(f"{s}_mlp.2", mlp_out, h, bias)]
    single = [LinearShape("linear1", h, 3 * h + mlp_in, bias), LinearShape("linear2", h + mlp_out, h, bias)]
    if v1:
        single.append(LinearShape("modulation.lin", h, 3 * h, True, per_token=False))
    return tuple(double), tuple(single)


def flux_shape(name: str, arch: str, hidden: int, double: int, single: int, context: int, *, guidance: bool,
               weight_bytes: float = 2.0) -> ModelShape:
    """A ``ModelShape`` from FLUX hyper-parameters (layer shapes of ComfyUI's ``Flux`` module).
    ``arch``: a family name, estimated with its ``memory_layout`` (Chroma as FLUX.1, which
    over-counts its missing per-block modulation)."""
    arch, text_tokens = memory_layout(arch)
    h, v1 = hidden, arch == "flux1"
    dl, sl = _flux_linears(arch, h)
    norms = 2 * HEAD_DIM
    d_params = sum(lin.params for lin in dl) + 2 * norms
    s_params = sum(lin.params for lin in sl) + norms
    in_ch = 64 if v1 else 128
    lin = lambda i, o: i * o + (o if v1 else 0)  # noqa: E731
    other = lin(in_ch, h) + lin(256, h) + lin(h, h) + lin(context, h) + lin(h, in_ch) + lin(h, 2 * h)
    if guidance:
        other += lin(256, h) + lin(h, h)
    if v1:
        other += lin(768, h) + lin(h, h)
    else:
        other += 2 * lin(h, 6 * h) + lin(h, 3 * h)  # global modulation
    return ModelShape(name=name, arch=arch, hidden=h, double_blocks=double, single_blocks=single,
                      double_linears=dl, single_linears=sl, double_block_bytes=int(d_params * weight_bytes),
                      single_block_bytes=int(s_params * weight_bytes), other_bytes=int(other * weight_bytes),
                      weight_bytes=weight_bytes, text_tokens=text_tokens)


def _released_shapes() -> dict[str, tuple]:
    """name → (arch, hidden, double, single, context dim, guidance embedding), from the one
    table of released models (``models.variants.VARIANTS``)."""
    from .models.variants import VARIANTS

    return {name: (s.family, s.hidden, s.double, s.single, s.context, s.guidance)
            for name, v in VARIANTS.items() if (s := v.shape) is not None}


KNOWN_SHAPES = _released_shapes()


def known_shape(name: str, weight_bytes: float = 2.0) -> ModelShape:
    """The real layer shapes of a released model (see ``KNOWN_SHAPES``)."""
    if name not in KNOWN_SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_SHAPES)}")
    arch, hidden, double, single, context, guidance = KNOWN_SHAPES[name]
    return flux_shape(name, arch, hidden, double, single, context, guidance=guidance, weight_bytes=weight_bytes)


def shape_from_module(module, arch: str, name: str = "model", text_tokens: Optional[int] = None) -> ModelShape:
    """The ``ModelShape`` of a BFL/ComfyUI FLUX module (``double_blocks``/``single_blocks``
    ModuleLists), with the bytes its tensors actually hold (fp8, quantized, any device
    including ``meta``). peft LoRA layers already injected are looked through."""
    from torch import nn

    def nbytes(m) -> int:
        seen, total = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen and not t.requires_grad:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def linears(block) -> tuple[LinearShape, ...]:
        out = []
        for n, m in block.named_modules():
            if isinstance(m, nn.Linear) and "lora_" not in n:
                n = n.removesuffix(".base_layer")  # peft wraps the base Linear
                out.append(LinearShape(n, m.in_features, m.out_features, m.bias is not None,
                                       per_token=not ("mod" in n.split(".")[0] or n.startswith("modulation"))))
        return tuple(out)

    arch, typical_tokens = memory_layout(arch)
    double, single = module.double_blocks, module.single_blocks
    block_total = sum(nbytes(b) for b in double) + sum(nbytes(b) for b in single)
    weights = [p for p in module.parameters() if p.is_floating_point() and p.dim() == 2]
    elem = weights[0].element_size() if weights else 2
    return ModelShape(
        name=name, arch=arch, hidden=int(module.img_in.weight.shape[0]), double_blocks=len(double),
        single_blocks=len(single), double_linears=linears(double[0]) if len(double) else (),
        single_linears=linears(single[0]) if len(single) else (),
        double_block_bytes=nbytes(double[0]) if len(double) else 0,
        single_block_bytes=nbytes(single[0]) if len(single) else 0,
        other_bytes=nbytes(module) - block_total, weight_bytes=float(elem),
        text_tokens=text_tokens if text_tokens is not None else typical_tokens,
        tokens_per_pixel=1 / 256)
