"""The LoRA branch's precision and what autograd keeps around frozen compressed base layers."""

import torch
from torch import nn

from trainer_core.config import LoRAConfig
from trainer_core.lora.network import LoraNetwork, is_linear


def _randomize(net, std=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_branch_runs_in_compute_dtype_with_fp32_master_grads():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    net = LoraNetwork.inject(root, LoRAConfig(rank=4, alpha=4.0), r"0")  # scale alpha/r = 1
    _randomize(net)
    seen = []
    handle = torch.overrides.TorchFunctionMode
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)

    class Record(handle):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is nn.functional.linear:
                seen.append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    with Record():
        y = root(x)
    assert y.dtype == torch.bfloat16
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen  # no fp32 copy of x
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in net.parameters())
    a, b = (p.detach() for p in net.parameters())
    ref = nn.functional.linear(x.detach(), root[0].base_layer.weight, root[0].base_layer.bias) \
        + (x.detach() @ a.bfloat16().T) @ b.bfloat16().T
    assert torch.allclose(y.detach().float(), ref.float(), atol=2e-2)


class QuantLinear(nn.Module):
    """A linear that is not an nn.Linear and stores a compressed weight (like ComfyUI's
    MixedPrecisionOps.Linear over a QuantizedTensor): int8 data × scale, expanded per forward."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = w.abs().max() / 127
        self.weight = nn.Parameter(Int8Weight(torch.round(w / scale).to(torch.int8), scale), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(w.shape[0]), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.dequantize().to(x.dtype), self.bias.to(x.dtype))


class Int8Weight(torch.Tensor):
    @staticmethod
    def __new__(cls, data, scale):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.float32, device=data.device)
        t.data8, t.scale = data, scale
        return t

    def dequantize(self):
        return self.data8.float() * self.scale

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        raise NotImplementedError(func)


def test_quantized_duck_linear_is_wrapped_and_keeps_no_expanded_weight():
    torch.manual_seed(0)
    w = torch.randn(12, 16)
    layer = QuantLinear(w)
    assert not isinstance(layer, nn.Linear) and is_linear(layer)
    root = nn.Sequential(layer)
    x = torch.randn(5, 16, requires_grad=True)
    before = root(x).detach()
    net = LoraNetwork.inject(root, LoRAConfig(rank=4, alpha=4.0), r"0")
    assert torch.equal(root(x).detach(), before)  # zero-init B
    _randomize(net)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = root(x)
    assert not {(12, 16), (16, 12)} & set(saved), saved  # the expanded weight (or its transpose) is not kept
    y.square().sum().backward()
    # reference: the same math with a plain weight
    x2 = x.detach().clone().requires_grad_(True)
    a, b = (p.detach() for p in net.parameters())
    ref = nn.functional.linear(x2, layer.weight.dequantize()) + (x2 @ a.T) @ b.T
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    net.remove()
    assert root[0] is layer


def test_fp8_base_keeps_no_cast_copy_and_gives_the_same_gradient():
    torch.manual_seed(0)

    class CastLinear(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    layer = CastLinear(16, 12)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    root = nn.Sequential(layer)
    x = torch.randn(5, 16, requires_grad=True)
    plain = nn.functional.linear(x, layer.weight.float(), layer.bias).square().sum()
    (g_plain,) = torch.autograd.grad(plain, x)
    net = LoraNetwork.inject(root, LoRAConfig(rank=4), r"0")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = root(x)
    assert not {(12, 16), (16, 12)} & set(saved), saved
    (g_lora,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.equal(g_lora, g_plain)  # B = 0: the base gradient, bitwise
    net.remove()
