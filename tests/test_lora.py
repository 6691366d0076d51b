"""LoRA injection on a real (tiny, random) diffusers FLUX.1 transformer; LoRA file IO."""

import copy
import json
import os

import pytest
import torch
from lora_tiny import run, tiny_flux, tiny_inputs
from torch import nn

import trainer_core
from trainer_core.config import LoRAConfig, TrainConfig, TrainingConfig
from trainer_core.lora import io as lora_io
from trainer_core.lora.bfl_names import flux_target_presets
from trainer_core.lora.network import LoraNetwork, resolve_target_regex

PRESETS = flux_target_presets()


def randomize(net, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def base():
    return tiny_flux()


def test_zero_init_leaves_outputs_unchanged_exactly(base):
    m = copy.deepcopy(base)
    x = tiny_inputs()
    before = run(m, x)
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, alpha=8, targets="all"), PRESETS["all"])
    assert torch.equal(run(m, x), before)
    randomize(net)
    assert (run(m, x) - before).abs().max() > 1e-3  # the LoRA is live


def test_only_lora_trains_with_stable_names(base):
    m = copy.deepcopy(base)
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, targets="attention"), PRESETS["attention"])
    expected = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.attn.to_add_out",
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
    ]
    assert net.modules_trained() == expected
    names = [n for n, _ in net.named_parameters()]
    assert names == [f"{e}.{ab}" for e in expected for ab in ("lora_A", "lora_B")]
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.parameters()}
    a = dict(net.named_parameters())["transformer_blocks.0.attn.to_q.lora_A"]
    assert a.shape == (4, 32) and a.dtype == torch.float32
    # a second injection on an identical copy gives the same names in the same order
    m2 = copy.deepcopy(base)
    assert [n for n, _ in LoraNetwork.inject(m2, LoRAConfig(rank=4), PRESETS["attention"]).named_parameters()] == names


def test_gradients_reach_only_lora(base):
    m = copy.deepcopy(base)
    net = LoraNetwork.inject(m, LoRAConfig(rank=2, targets="all"), PRESETS["all"])
    m(**tiny_inputs(), return_dict=False)[0].square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["single_transformer_blocks.0.proj_mlp.lora_B"].abs().sum() > 0  # B gets grad even at B = 0
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_lora_dtype_stays_fp32_over_bf16_base(base):
    m = copy.deepcopy(base).to(torch.bfloat16)
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, dtype="fp32"), PRESETS["attention"])
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    net16 = LoraNetwork.inject(copy.deepcopy(base), LoRAConfig(rank=4, dtype="bf16"), PRESETS["attention"])
    assert {p.dtype for p in net16.parameters()} == {torch.bfloat16}
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_inputs().items()}
    assert run(m, x).dtype == torch.bfloat16


class CastLinear(nn.Linear):
    """Stand-in for ComfyUI's manual-cast Linear: fp8 weights, cast to the input dtype."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_fp8_cast_on_forward_subclass_is_wrapped():
    torch.manual_seed(0)
    layer = CastLinear(8, 6)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    root = nn.Sequential(layer)
    x = torch.randn(3, 8)
    before = root(x)
    net = LoraNetwork.inject(root, LoRAConfig(rank=2), r"0")
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    a = net.parameters()[0]
    assert a.abs().max() > 0 and torch.unique(a).numel() > 8  # an fp32 init, not fp8-quantised
    assert torch.equal(root(x), before)
    randomize(net)
    assert not torch.allclose(root(x), before)
    net.remove()
    assert root[0] is layer and torch.equal(root(x), before)


def test_disabled_gives_base_outputs_and_restores_after_errors(base):
    m = copy.deepcopy(base)
    x = tiny_inputs()
    ref = run(m, x)
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, targets="all"), PRESETS["all"])
    randomize(net)
    with_lora = run(m, x)
    assert not torch.allclose(with_lora, ref)
    with net.disabled():
        assert torch.equal(run(m, x), ref)
        assert not any(p.requires_grad for p in net.parameters())
    assert torch.equal(run(m, x), with_lora)
    with pytest.raises(RuntimeError, match="boom"), net.disabled():
        raise RuntimeError("boom")
    assert torch.equal(run(m, x), with_lora)
    assert all(p.requires_grad for p in net.parameters())


def test_multiplier_scales_the_update():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(8, 6))
    x = torch.randn(3, 8)
    base_out = root(x).detach()
    net = LoraNetwork.inject(root, LoRAConfig(rank=2, alpha=4), r"0")
    randomize(net)
    delta = root(x).detach() - base_out
    a, b, scale = net.weights()["0"]
    assert scale == 2.0
    torch.testing.assert_close(delta, scale * x @ a.T @ b.T)
    net.set_multiplier(0.5)
    torch.testing.assert_close(root(x).detach() - base_out, 0.5 * delta)
    net.set_multiplier(0.0)
    assert torch.equal(root(x), base_out)
    assert net.weights()["0"][2] == 2.0  # the saved scale ignores the strength


def test_remove_restores_tree_flags_and_outputs_bitwise(base):
    m = copy.deepcopy(base)
    m.proj_out.weight.requires_grad_(False)  # an unusual flag must survive too
    x = tiny_inputs()
    ref = run(m, x)
    tree = [(n, id(mod)) for n, mod in m.named_modules()]
    flags = [(n, p.requires_grad) for n, p in m.named_parameters()]
    had_attrs = set(vars(m))
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, targets="all"), PRESETS["all"])
    randomize(net)
    assert not torch.equal(run(m, x), ref)
    net.remove()
    assert [(n, id(mod)) for n, mod in m.named_modules()] == tree
    assert [(n, p.requires_grad) for n, p in m.named_parameters()] == flags
    assert set(vars(m)) == had_attrs
    assert torch.equal(run(m, x), ref)
    with pytest.raises(RuntimeError, match="removed"):
        net.weights()
    LoraNetwork.inject(m, LoRAConfig(rank=2), PRESETS["attention"])  # can inject again


def test_double_injection_is_refused(base):
    m = copy.deepcopy(base)
    LoraNetwork.inject(m, LoRAConfig(rank=2), PRESETS["attention"])
    with pytest.raises(ValueError, match="remove"):
        LoraNetwork.inject(m, LoRAConfig(rank=2), PRESETS["attention"])


def test_regex_matching_nothing_lists_module_names(base):
    m = copy.deepcopy(base)
    with pytest.raises(
        ValueError,
        match=r"matches no Linear.*x_embedder|matches no Linear.*transformer_blocks",
    ):
        LoraNetwork.inject(m, LoRAConfig(rank=2), r"blocks\.\d+\.nonexistent")
    # a regex that only matches non-Linear modules (the attention block) also matches nothing
    with pytest.raises(ValueError, match="matches no Linear"):
        LoraNetwork.inject(m, LoRAConfig(rank=2), r"transformer_blocks\.0\.attn")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoraNetwork.inject(m, LoRAConfig(rank=2), r"transformer_blocks.(")
    assert not any(p.requires_grad is False for p in m.parameters())  # nothing was touched


def test_state_dict_and_weights_round_trip(base):
    cfg = LoRAConfig(rank=3, alpha=6, targets="attention")
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    n1 = LoraNetwork.inject(m1, cfg, PRESETS["attention"])
    n2 = LoraNetwork.inject(m2, cfg, PRESETS["attention"])
    randomize(n1)
    n2.load_state_dict(n1.state_dict())
    x = tiny_inputs()
    assert torch.equal(run(m1, x), run(m2, x))
    with pytest.raises(ValueError, match="missing"):
        n2.load_state_dict({k: v for k, v in list(n1.state_dict().items())[1:]})
    # weights() form with a different scale is folded into B: same update
    w = {k: (a, b * 2.0, s / 2.0) for k, (a, b, s) in n1.weights().items()}
    randomize(n2, seed=7)
    n2.load_weights(w)
    torch.testing.assert_close(run(m2, x), run(m1, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expected A"):
        n2.load_weights({k: (a[:1], b[:, :1], s) for k, (a, b, s) in n1.weights().items()})


def test_resolve_target_regex():
    assert resolve_target_regex(LoRAConfig(targets="all"), PRESETS) == PRESETS["all"]
    assert resolve_target_regex(LoRAConfig(targets="custom", target_regex="a.*"), PRESETS) == "a.*"
    with pytest.raises(ValueError, match="no preset"):
        resolve_target_regex(LoRAConfig(targets="all"), {"attention": "x"})


# ---------------------------------------------------------------------- io
def test_metadata_has_required_keys_and_config_round_trips(tmp_path):
    cfg = TrainingConfig(
        lora=LoRAConfig(rank=8, alpha=4.0),
        train=TrainConfig(steps=500, output_name="myface"),
    )
    md = lora_io.build_metadata(
        cfg,
        arch="flux1",
        steps=250,
        trigger_word="ohwx",
        base_model="flux1-dev.safetensors",
    )
    for key in [
        "flowtrain.format_version",
        "flowtrain.config",
        "flowtrain.arch",
        "flowtrain.trigger_word",
        "flowtrain.steps",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_module",
        "ss_resolution",
        "ss_steps",
        "ss_max_train_steps",
        "ss_learning_rate",
        "ss_base_model_version",
        "ss_output_name",
        "modelspec.architecture",
    ]:
        assert key in md, key
    assert md["flowtrain.format_version"] == str(trainer_core.FORMAT_VERSION)
    assert (md["ss_network_dim"], md["ss_steps"], md["ss_max_train_steps"]) == (
        "8",
        "250",
        "500",
    )
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["ss_base_model_version"] == "flux1"
    path = str(tmp_path / "a.safetensors")
    lora_io.save_lora_file(path, {"x": torch.ones(2)}, md)
    tensors, md2 = lora_io.load_lora_file(path)
    assert md2 == md and torch.equal(tensors["x"], torch.ones(2))
    assert TrainingConfig.from_dict(json.loads(md2["flowtrain.config"])) == cfg
    assert lora_io.read_config(md2) == cfg
    with pytest.raises(ValueError, match="strings"):
        lora_io.save_lora_file(path, {"x": torch.ones(2)}, {"steps": 3})


def test_atomic_save_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "lora.safetensors")
    lora_io.save_lora_file(path, {"w": torch.zeros(3)}, {"v": "1"})
    lora_io.save_lora_file(path, {"w": torch.ones(3)}, {"v": "2"})
    assert os.listdir(tmp_path) == ["lora.safetensors"]

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        lora_io.save_lora_file(path, {"w": torch.full((3,), 7.0)}, {"v": "3"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    tensors, md = lora_io.load_lora_file(path)
    assert md == {"v": "2"} and torch.equal(tensors["w"], torch.ones(3))
    with pytest.raises(ValueError, match="does not exist"):
        lora_io.load_lora_file(str(tmp_path / "missing.safetensors"))
