"""LoRA layers on any ``nn.Module``, injected with peft and removable without a trace.

The layer type is ``cfg.algorithm`` (``lora.algorithms``: lora, dora, loha, lokr); the plain
LoRA case is described here, the others in ``algorithms``.

Each targeted linear layer (``is_linear``: an ``nn.Linear`` or subclass, e.g. ComfyUI's
cast-on-forward layers holding bf16/fp8 weights, or a duck-typed linear such as ComfyUI's
``MixedPrecisionOps.Linear`` whose weight is a quantized tensor; the base layer's own
``forward`` always runs, so a quantized weight stays quantized) becomes

    y = base(x) + m · (alpha / r) · B (A dropout(x)),  A [r, in], B [out, r]

(Hu et al. 2021, "LoRA", eq. 3; ``m`` is the strength multiplier). A is Kaiming-uniform,
B zero, so an injected network leaves outputs unchanged. A and B live in ``cfg.dtype``
whatever the base dtype (fp32 master weights by default); every other parameter is frozen.

The LoRA branch runs in the dtype of the base layer's output (the compute dtype, e.g. bf16):
A and B are cast per forward (r·(in+out) elements, a differentiable cast, so their gradients
land in the fp32 masters). The scale multiplies the rank-r activation ``A x`` and the up
projection is added to the base output by one ``addmm``, so the branch adds no elementwise
pass over the [tokens, out] output. peft's own layer instead casts the activation to the LoRA dtype
and computes the branch in fp32, which costs an fp32 copy of every input and fp32 matmuls.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator

import torch
from torch import nn

from trainer_core.config import LoRAConfig
from trainer_core.lora.algorithms import ALGORITHMS, Algorithm
from trainer_core.lora.patch_rules import Record

log = logging.getLogger(__name__)

ADAPTER = "default"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""module name → (A [r, in] fp32, B [out, r] fp32, scale = alpha / r)."""


def resolve_target_regex(cfg: LoRAConfig, presets: dict[str, str]) -> str:
    """The regex for ``cfg.targets``: ``cfg.target_regex`` for 'custom', else the preset."""
    if cfg.targets == "custom":
        return cfg.target_regex
    if cfg.targets not in presets:
        raise ValueError(f"lora.targets={cfg.targets!r} has no preset for this model; known: {sorted(presets)}")
    return presets[cfg.targets]


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear``, or a module that computes one without subclassing it: integer
    ``in_features``/``out_features`` and a ``weight`` of shape [out, in] (ComfyUI's
    ``MixedPrecisionOps.Linear``, whose weight may be a ``QuantizedTensor`` reporting its
    logical shape)."""
    if isinstance(m, nn.Linear):
        return True
    n_in, n_out = getattr(m, "in_features", None), getattr(m, "out_features", None)
    weight = getattr(m, "weight", None)
    return (isinstance(n_in, int) and isinstance(n_out, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (n_out, n_in))


FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


def stores_compressed(weight) -> bool:
    """A weight the layer expands on every forward: a quantized tensor subclass (anything
    with ``dequantize``, e.g. ComfyUI's ``QuantizedTensor``) or plain fp8 storage."""
    return (type(weight) not in (torch.Tensor, nn.Parameter) and callable(getattr(weight, "dequantize", None))) \
        or getattr(weight, "dtype", None) in FP8_DTYPES


class FrozenCompressedLinear(torch.autograd.Function):
    """``layer(x)`` for a frozen linear whose weight is quantized or fp8, with a backward that
    keeps nothing but the layer: the layer's own forward runs (its quantized kernel, or its
    per-forward dequantize), and backward dequantizes the weight once more, for this layer
    only, to compute ``grad_x = grad · W`` (times an AWQ ``pre_quant_scale`` if the layer has
    one). Plain autograd would keep each layer's expanded weight (and ComfyUI's quantized
    path its input) from forward to backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight = ctx.layer.weight
        w = weight.dequantize() if callable(getattr(weight, "dequantize", None)) else weight
        gx = grad @ w.to(device=grad.device, dtype=grad.dtype)
        scale = getattr(ctx.layer, "pre_quant_scale", None)
        if scale is not None:
            gx = gx * scale.to(device=gx.device, dtype=gx.dtype)
        return gx.to(ctx.x_dtype), None


def _lora_linear_class():
    """peft's LoRA ``Linear`` with the branch in the compute dtype (see the module doc),
    defined lazily so importing this module does not import peft."""
    global _LORA_LINEAR
    if _LORA_LINEAR is not None:
        return _LORA_LINEAR
    from peft.tuners.lora.layer import Linear as PeftLinear

    class ComputeDtypeLinear(PeftLinear):
        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            active = [a for a in self.active_adapters if a in self.lora_A]
            if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
                    or any(a in self.lora_variant for a in active)):
                return super().forward(x, *args, **kwargs)
            if not args and not kwargs and x.requires_grad and stores_compressed(self.base_layer.weight):
                result = FrozenCompressedLinear.apply(x, self.base_layer)
            else:
                result = self.base_layer(x, *args, **kwargs)
            for name in active:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                dtype = result.dtype
                h = nn.functional.linear(self.lora_dropout[name](x).to(dtype), a.to(dtype)) * self.scaling[name]
                result = _add_up_projection(result, h, b.to(dtype))
            return result

    _LORA_LINEAR = ComputeDtypeLinear
    return _LORA_LINEAR


_LORA_LINEAR = None


def _add_up_projection(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``result + h·Bᵀ`` as one ``addmm`` (the scale is already in ``h``, [.., r]): no
    elementwise pass over the [tokens, out] output for the scale or the sum, forward or
    backward (``addmm``'s gradient to ``result`` is the incoming gradient itself)."""
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return out.view(result.shape)


def _peft_native_kinds() -> set[type]:
    """Linear classes peft has dedicated LoRA layers for (bitsandbytes 8-bit / 4-bit). Only
    looked up if bitsandbytes is already imported: otherwise no such layer can exist."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return set()
    return {getattr(bnb.nn, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(bnb.nn, n)}


def matching_linears(module: nn.Module, target_regex: str) -> list[str]:
    """Names of the linear submodules (``is_linear``) whose full name ``re.fullmatch``-es
    the regex, in module order. Matches that are not linear layers are ignored."""
    try:
        pattern = re.compile(target_regex)
    except re.error as e:
        raise ValueError(f"LoRA target regex {target_regex!r} is not a valid regular expression: {e}") from None
    return [n for n, m in module.named_modules() if n and is_linear(m) and pattern.fullmatch(n)]


class LoraNetwork:
    """The LoRA layers injected into one module; use ``LoraNetwork.inject``."""

    def __init__(
        self,
        root: nn.Module,
        cfg: LoRAConfig,
        layers: dict[str, nn.Module],
        restore: dict,
    ):
        self.root = root
        self.cfg = cfg
        self._layers = layers  # module name → peft lora.Linear, in module order
        self._restore = restore
        self._multiplier = 1.0
        self._removed = False
        self.algorithm: Algorithm = ALGORITHMS.get(cfg.algorithm)

    # ------------------------------------------------------------------ building
    @classmethod
    def inject(cls, module: nn.Module, cfg: LoRAConfig, target_regex: str,
               ranks: dict[str, int] | None = None) -> LoraNetwork:
        """Wrap every Linear whose name fullmatches ``target_regex`` with a LoRA layer.
        ``ranks`` gives some modules another rank (alpha scaled along, so alpha/rank is
        the same everywhere), e.g. to continue from a file whose fused layers have more."""
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
            raise ValueError("this module already carries LoRA layers; call remove() on the old LoraNetwork first")
        names = matching_linears(module, target_regex)
        if not names:
            linears = [n for n, m in module.named_modules() if is_linear(m)]
            raise ValueError(
                f"LoRA target regex {target_regex!r} matches no Linear layer (re.fullmatch on module names). "
                f"{len(linears)} Linear layers exist, e.g.: {', '.join(linears[:8])}. Fix lora.target_regex "
                "or choose targets='attention'/'all'."
            )
        restore = {
            "requires_grad": [(p, p.requires_grad) for p in module.parameters()],
            "had_peft_config": "peft_config" in vars(module),
            "peft_config": vars(module).get("peft_config"),
        }
        algorithm = ALGORITHMS.get(cfg.algorithm)
        exact = "(?:" + "|".join(re.escape(n) for n in names) + ")"
        peft_cfg = algorithm.peft_config(cfg, exact)
        if ranks:
            peft_cfg.rank_pattern = {re.escape(n): r for n, r in ranks.items()}
            peft_cfg.alpha_pattern = {re.escape(n): cfg.alpha * r / cfg.rank for n, r in ranks.items()}
        if isinstance(peft_cfg, peft.LoraConfig):  # lora and dora: the compute-dtype layer (module doc)
            # peft's own layers stay in charge of bitsandbytes-quantized linears
            kinds = {type(module.get_submodule(n)) for n in names} - _peft_native_kinds()
            peft_cfg._register_custom_module({kind: _lora_linear_class() for kind in kinds})
        peft.inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
        dtype = DTYPES[cfg.dtype]
        layers = {}
        for n in names:
            layer = module.get_submodule(n)
            algorithm.prepare(layer, cfg, dtype)
            layers[n] = layer
        for p in module.parameters():
            p.requires_grad_(False)
        net = cls(module, cfg, layers, restore)
        for _, p in net.named_parameters():
            p.requires_grad_(True)
        log.info("%s rank %d on %d layers (%s)", cfg.algorithm, cfg.rank, len(names), cfg.dtype)
        return net

    # ------------------------------------------------------------------ parameters
    def _check(self) -> None:
        if self._removed:
            raise RuntimeError("this LoRA network was removed; inject a new one")

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """("<module>.<suffix>", tensor) for each layer in module order, the suffixes the
        algorithm's (LoRA: ``lora_A``, ``lora_B``; DoRA adds ``dora_magnitude``)."""
        self._check()
        for n, layer in self._layers.items():
            for suffix, p in self.algorithm.params(layer):
                yield f"{n}.{suffix}", p

    def loraplus_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(base-lr parameters, LoRA+ fast parameters), as the algorithm assigns them."""
        slow, fast = [], []
        for n, layer in self._layers.items():
            for suffix, p in self.algorithm.params(layer):
                (fast if self.algorithm.loraplus_fast(suffix) else slow).append(p)
        return slow, fast

    def records(self) -> dict[str, Record]:
        """module → its adapter as ComfyUI key suffixes (``algorithms.Record``), fp32, at
        multiplier 1; what the file formats write."""
        self._check()
        return {n: self.algorithm.export(layer) for n, layer in self._layers.items()}

    def load_records(self, records: dict[str, Record]) -> None:
        """Set every layer from ``records`` (``records()`` form, e.g. read from a file)."""
        self._check()
        missing, extra = sorted(set(self._layers) - set(records)), sorted(set(records) - set(self._layers))
        if missing or extra:
            raise ValueError(f"LoRA weights do not match this network: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, rec in records.items():
            try:
                self.algorithm.load(self._layers[n], rec)
            except ValueError as e:
                raise ValueError(f"{n}: {e}") from None

    def layer(self, name: str) -> nn.Module:
        return self._layers[name]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules_trained(self) -> list[str]:
        return list(self._layers)

    @property
    def multiplier(self) -> float:
        return self._multiplier

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of A and B by their ``named_parameters`` names (checkpoints)."""
        return {k: p.detach().clone() for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by ``state_dict``; the key set and shapes must match exactly."""
        params = dict(self.named_parameters())
        missing, extra = (
            sorted(set(params) - set(state)),
            sorted(set(state) - set(params)),
        )
        if missing or extra:
            raise ValueError(f"LoRA state does not match this network: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for k, p in params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"LoRA state {k!r} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[k])

    def weights(self) -> LoraWeights:
        """module → (A [r, in] fp32, B [out, r] fp32, scale alpha/r); the multiplier is not in it.
        Plain LoRA only (other algorithms: ``records``)."""
        self._check()
        if self.algorithm.name != "lora":
            raise ValueError(f"weights() is the plain-LoRA form; a {self.algorithm.name} network has records()")
        out = {}
        for n, layer in self._layers.items():
            a = layer.lora_A[ADAPTER].weight.detach().float().clone()
            b = layer.lora_B[ADAPTER].weight.detach().float().clone()
            out[n] = (a, b, float(layer.lora_alpha[ADAPTER]) / layer.r[ADAPTER])
        return out

    def load_weights(self, weights: LoraWeights) -> None:
        """Set A and B from ``weights()``-form data covering exactly the trained modules.
        A scale that differs from this network's alpha/r is folded into B (same ΔW)."""
        self._check()
        missing, extra = (
            sorted(set(self._layers) - set(weights)),
            sorted(set(weights) - set(self._layers)),
        )
        if missing or extra:
            raise ValueError(f"LoRA weights do not match this network: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for n, (a, b, scale) in weights.items():
                layer = self._layers[n]
                pa, pb = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if tuple(a.shape) != tuple(pa.shape) or tuple(b.shape) != tuple(pb.shape):
                    raise ValueError(
                        f"LoRA weights for {n!r}: A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                        f"A {tuple(pa.shape)}, B {tuple(pb.shape)} (rank {self.cfg.rank})"
                    )
                own = float(layer.lora_alpha[ADAPTER]) / layer.r[ADAPTER]
                pa.copy_(a)
                pb.copy_(b.float() * (scale / own) if scale != own else b)

    # ------------------------------------------------------------------ switches
    def set_multiplier(self, m: float) -> None:
        """Strength: scale every update by ``m`` on top of alpha/r (1.0 = as trained)."""
        self._check()
        for layer in self._layers.values():
            layer.set_scale(ADAPTER, float(m))
        self._multiplier = float(m)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model only (e.g. a preservation prior pass). LoRA parameters have
        ``requires_grad`` False inside; everything is restored on exit, also on error."""
        self._check()
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for layer in self._layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._layers.values():
                layer.enable_adapters(True)
            for p, flag in flags:
                p.requires_grad_(flag)

    def remove(self) -> None:
        """Put the original Linear objects back, restore every ``requires_grad`` flag and drop
        the ``peft_config`` attribute peft added: the module is as before ``inject``."""
        self._check()
        for n, layer in self._layers.items():
            parent_name, _, child = n.rpartition(".")
            parent = self.root.get_submodule(parent_name) if parent_name else self.root
            setattr(parent, child, layer.base_layer)
        for p, flag in self._restore["requires_grad"]:
            p.requires_grad_(flag)
        if self._restore["had_peft_config"]:
            self.root.peft_config = self._restore["peft_config"]
        elif "peft_config" in vars(self.root):
            del self.root.peft_config
        self._layers = {}
        self._removed = True


def strip_lora_layers(module: nn.Module) -> int:
    """Put back every base layer peft wrapped in ``module``: the safety net for a caller that
    could not ``LoraNetwork.remove()`` (an error before it got the network), so a shared model
    is never left carrying LoRA layers. Returns how many layers were unwrapped."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft absent: nothing can have been injected
        return 0
    leftovers = [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in leftovers:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, getattr(parent, child).get_base_layer())
    if leftovers:
        vars(module).pop("peft_config", None)
        log.warning("removed %d LoRA layers left in the model after training", len(leftovers))
    return len(leftovers)
