"""LoRA algorithms (lora, dora, loha, lokr) on the tiny diffusers FLUX.1: layers, files, reload."""

import copy

import pytest
import torch
from lora_tiny import run, tiny_flux, tiny_inputs
from test_lora_formats import TinyFlux

from trainer_core.config import ConfigError, LoRAConfig, TrainingConfig
from trainer_core.lora import io as lora_io
from trainer_core.lora import records as lora_records
from trainer_core.lora.algorithms import ALGORITHMS
from trainer_core.lora.patch_rules import patched_weight
from trainer_core.lora.bfl_names import flux_target_presets
from trainer_core.lora.formats import LORA_FORMATS, apply_to_module
from trainer_core.lora.network import LoraNetwork

ALL = flux_target_presets()["all"]
# LoKr cannot fuse split q/k/v into ComfyUI's qkv: train the unfused layers only
UNFUSED = (r"transformer_blocks\.0\.(?:attn\.to_out\.0|attn\.to_add_out|ff\.net\.0\.proj|ff\.net\.2)"
           r"|single_transformer_blocks\.0\.proj_out")
CASES = [("lora", {}, ALL), ("dora", {}, ALL), ("loha", {}, ALL), ("lokr", {}, UNFUSED),
         ("lokr", {"lokr_factor": 4, "lokr_decompose_both": True}, UNFUSED),
         ("lokr", {"lokr_full_matrix": True}, UNFUSED)]
IDS = ["lora", "dora", "loha", "lokr", "lokr-f4-both", "lokr-full"]


@pytest.fixture(scope="module")
def base():
    return tiny_flux()


def perturbed(base, algorithm, extra, regex, seed=1, rank=4, alpha=6.0):
    m = copy.deepcopy(base)
    net = LoraNetwork.inject(m, LoRAConfig(rank=rank, alpha=alpha, algorithm=algorithm, **extra), regex)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m, net


@pytest.mark.parametrize(("algorithm", "extra", "regex"), CASES, ids=IDS)
def test_injection_is_neutral_then_live_and_removable(base, algorithm, extra, regex):
    m = copy.deepcopy(base)
    x = tiny_inputs()
    before = run(m, x)
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, alpha=6.0, algorithm=algorithm, **extra), regex)
    assert (run(m, x) - before).abs().max() <= 1e-6
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.parameters()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    live = run(m, x)
    assert (live - before).abs().max() > 1e-3
    with net.disabled():
        assert torch.equal(run(m, x), run(base, x))
    net.set_multiplier(0.0)
    if algorithm != "dora":  # DoRA's magnitude still rescales the rows at multiplier 0
        assert (run(m, x) - before).abs().max() <= 1e-5
    net.set_multiplier(1.0)
    assert torch.equal(run(m, x), live)
    net.remove()
    assert torch.equal(run(m, x), before)


@pytest.mark.parametrize(("algorithm", "extra", "regex"), CASES, ids=IDS)
@pytest.mark.parametrize("fmt", ["flux1_kohya", "flux2_diffusion_model"])
def test_saved_file_reproduces_predictions(base, tmp_path, algorithm, extra, regex, fmt):
    m, net = perturbed(base, algorithm, extra, regex)
    x = tiny_inputs()
    want = run(m, x)
    path = str(tmp_path / "lora.safetensors")
    tensors = LORA_FORMATS.get(fmt).to_tensors(net, TinyFlux(m))
    key = {"lora": "lora_", "dora": "dora_scale", "loha": "hada_w1_a", "lokr": "lokr_w"}[algorithm]
    assert any(key in k for k in tensors)
    lora_io.save_lora_file(path, tensors, {})
    loaded, _ = lora_io.load_lora_file(path)
    fresh = copy.deepcopy(base)
    changed = apply_to_module(fresh, TinyFlux(fresh), loaded, fmt)
    assert set(net.modules_trained()) <= set(changed)
    assert (run(fresh, x) - want).abs().max() <= 1e-5


@pytest.mark.parametrize(("algorithm", "extra", "regex"), CASES, ids=IDS)
def test_records_and_state_round_trip_into_a_new_network(base, algorithm, extra, regex):
    m, net = perturbed(base, algorithm, extra, regex)
    x = tiny_inputs()
    want = run(m, x)
    m2 = copy.deepcopy(base)
    net2 = LoraNetwork.inject(m2, LoRAConfig(rank=4, alpha=6.0, algorithm=algorithm, **extra), regex)
    net2.load_records(net.records())
    assert (run(m2, x) - want).abs().max() <= 1e-5
    net2.load_state_dict(net.state_dict())
    assert torch.equal(run(m2, x), want)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in net2.named_parameters()]


def test_lokr_on_split_qkv_is_refused_with_the_reason(base):
    m = copy.deepcopy(base)
    model = TinyFlux(m)
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"]
    why = lora_records.fused_split_refusal("lokr", names, model.bfl_name)
    assert "to_q" in why and "Kronecker" in why
    assert lora_records.fused_split_refusal("loha", names, model.bfl_name) == ""
    net = LoraNetwork.inject(m, LoRAConfig(rank=4, algorithm="lokr"), ALL)
    with pytest.raises(ValueError, match="cannot write split parts"):
        LORA_FORMATS.get("flux1_kohya").to_tensors(net, model)


def test_dora_scale_follows_comfyui_output_axis_rule():
    """ComfyUI divides by the row norms of the original W; our export compensates."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(3, 6)
    net = LoraNetwork.inject(lin, LoRAConfig(rank=2, alpha=2.0, algorithm="dora"), r"0")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    want = lin(x)
    rec = net.records()["0"]
    assert rec["dora_scale"].shape == (5, 1)
    w = net.layer("0").get_base_layer().weight
    new_w = patched_weight(w, rec)
    got = torch.nn.functional.linear(x, new_w, net.layer("0").get_base_layer().bias)
    assert (got - want).abs().max() <= 1e-5


def test_loraplus_groups_per_algorithm(base):
    _, dora = perturbed(base, "dora", {}, UNFUSED)
    slow, fast = dora.loraplus_split()
    names = {id(p): n for n, p in dora.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[1] for p in fast} == {"lora_B"}
    assert {names[id(p)].rsplit(".", 1)[1] for p in slow} == {"lora_A", "dora_magnitude"}
    for algo in ("loha", "lokr"):
        with pytest.raises(ConfigError, match=f"algorithm='{algo}'.*no .*B side"):
            TrainingConfig.from_dict({"lora": {"algorithm": algo}, "optim": {"loraplus_lr_ratio": 16}})
    TrainingConfig.from_dict({"lora": {"algorithm": "dora"}, "optim": {"loraplus_lr_ratio": 16}})


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="lora.algorithm.*lora.*dora.*loha.*lokr"):
        LoRAConfig(algorithm="oft")
    assert ALGORITHMS.names() == ["lora", "dora", "loha", "lokr"]


def test_lycoris_algorithms_refuse_lora_dropout():
    with pytest.raises(ConfigError, match=r"lora.dropout=0.1 .*lora.algorithm='lokr'"):
        LoRAConfig(algorithm="lokr", dropout=0.1)
    LoRAConfig(algorithm="dora", dropout=0.1)
