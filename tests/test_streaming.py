"""Weight streaming, the memory planner and the ``memory`` config section, on the CPU.

Streaming's storage and compute placements are both the CPU here, so the same code path
as on a GPU runs: fetch into separate compute tensors, prefetch, evict, recompute fetch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from test_bfl_flux import StandIn, _inputs, _model
from trainer_core import budget, memory
from trainer_core.config import ConfigError, LoRAConfig, MemoryConfig, TrainingConfig
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux
from trainer_core.session import train_lora
from trainer_core.streaming import BlockStreamer, StreamingBudgetError, block_table


def _bfl(seed=0):
    torch.manual_seed(seed)
    return BflFlux(StandIn(), arch="flux1", guidance_embed=True, latent_channels=16, patch_size=2)


def _train(tiny_training, name, **dotted):
    config = tiny_training.config(**{"train.output_name": name, "train.gradient_checkpointing": True,
                                     "train.steps": 3, **dotted})
    model = _bfl()
    result = train_lora(config, model, DctCodec(), HashTextEncoder(width=8, pooled_width=4))
    return result, model


def test_streaming_all_trains_bitwise_the_same_lora(tiny_training):
    plain, plain_model = _train(tiny_training, "plain")
    streamed, model = _train(tiny_training, "streamed", **{"memory.streaming": "all"})
    assert plain_model.streamer is None and plain_model.memory_plan.streamed == ()
    assert model.memory_plan.checkpoint == "blocks" and len(model.memory_plan.streamed) == 4
    # every block fetched in each forward and again for its recompute in backward
    assert model.streamer.fetches >= 3 * 4 * 2
    a, b = load_file(str(plain.lora_path)), load_file(str(streamed.lora_path))
    assert a.keys() == b.keys() and len(a) > 0
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_up" in k or "lora_B" in k)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # after training, the slots hold the storage tensors again, not a compute copy
    for name in model.memory_plan.streamed:
        block = block_table(model.module)[name]
        assert all(not p.requires_grad for n, p in block.named_parameters() if "lora_" not in n)


def _loss_step(model, x, sigma, text, target):
    F.mse_loss(model.velocity(x, sigma, text, 1.0), target).backward()


def test_plan_ledger_never_exceeds_the_budget():
    model = _bfl()
    x, sigma, text, target = _inputs("flux1")
    net = LoraNetwork.inject(model.module, LoRAConfig(rank=2), model.default_targets["all"])
    shape = model.memory_shape()
    run = memory.RunShape(batch=2, rank=2, targets="all", compute_bytes=4, tokens=16 + 5)
    full = memory.estimate(shape, run, checkpoint="blocks")
    # a budget that fits with three blocks streamed but not fewer (two streamed blocks
    # save nothing: the two stream buffers hold as much as they did)
    order = sorted(shape.block_names(), key=shape.block_bytes, reverse=True)
    three = memory.estimate(shape, run, checkpoint="blocks", streamed=tuple(order[:3]))
    assert three.total < full.total
    plan = budget.plan_memory(shape, run, three.total)
    assert plan.checkpoint == "blocks" and len(plan.streamed) == 3
    assert {"double_blocks.0", "double_blocks.1"} < set(plan.streamed)  # largest first
    model.apply_memory_plan(plan)
    for _ in range(2):
        _loss_step(model, x, sigma, text, target)
    ledger = model.streamer.ledger
    assert 0 < ledger.peak <= plan.weight_limit <= plan.budget
    assert ledger.current == model.streamer._resident  # every compute copy was freed
    assert all(p.grad is not None for p in net.parameters())


def test_ledger_refuses_a_fetch_over_the_limit():
    """Without recompute autograd keeps every streamed block's compute copy: the ledger
    catches that instead of letting memory grow."""
    model = _bfl()
    x, sigma, text, target = _inputs("flux1")
    LoraNetwork.inject(model.module, LoRAConfig(rank=2), model.default_targets["all"])
    table = block_table(model.module)
    one_block = sum(p.numel() * 4 for p in table["double_blocks.0"].parameters() if not p.requires_grad)
    resident = sum(p.numel() * 4 for p in model.module.parameters() if not p.requires_grad) \
        - 2 * one_block - sum(p.numel() * 4 for n in ("single_blocks.0", "single_blocks.1")
                              for p in table[n].parameters() if not p.requires_grad)
    streamer = BlockStreamer(table, list(table), "cpu", limit=resident + 2 * one_block)
    streamer.attach(model.module)
    model.streamer, model.checkpoint = streamer, "off"
    with pytest.raises(StreamingBudgetError, match="limit"):
        _loss_step(model, x, sigma, text, target)


def test_streamed_forward_without_grad_matches():
    model = _bfl()
    x, sigma, text, _ = _inputs("flux1")
    with torch.no_grad():
        ref = model.velocity(x, sigma, text, 1.0)
        plan = budget.plan_memory(model.memory_shape(), memory.RunShape(compute_bytes=4, tokens=21), budget.UNLIMITED,
                                  streaming="all")
        model.apply_memory_plan(plan)
        assert torch.equal(model.velocity(x, sigma, text, 1.0), ref)
    assert model.streamer.fetches == 4


# ---------------------------------------------------------------------------- planner
def test_planner_prefers_no_recompute_then_checkpointing_then_fewest_streamed():
    shape = memory.known_shape("flux1-dev")
    run = memory.RunShape(resolution=512)
    off = memory.estimate(shape, run, checkpoint="off")
    blocks = memory.estimate(shape, run, checkpoint="blocks")
    assert blocks.total < off.total and blocks.activations_kept < off.activations_kept
    assert budget.plan_memory(shape, run, off.total).checkpoint == "off"
    p = budget.plan_memory(shape, run, off.total - 1)
    assert (p.checkpoint, p.streamed) == ("blocks", ())
    p8 = budget.plan_memory(shape, run, 8 * memory.GiB)
    assert p8.checkpoint == "blocks" and 0 < len(p8.streamed) < 57 and p8.estimate.total <= 8 * memory.GiB
    fewer = memory.estimate(shape, run, checkpoint="blocks", streamed=p8.streamed[1:])
    assert fewer.total > 8 * memory.GiB  # one block fewer would not fit
    assert p8.summary().startswith(f"{len(p8.streamed)} of 57 blocks streamed, block checkpointing, est. peak ")
    assert p8.summary().endswith("of 8.0 GB")
    with pytest.raises(budget.MemoryBudgetError, match="memory.streaming"):
        budget.plan_memory(shape, run, 8 * memory.GiB, streaming="off")
    assert len(budget.plan_memory(shape, run, budget.UNLIMITED, streaming="all").streamed) == 57


def test_a_run_that_cannot_fit_is_refused_with_the_cheapest_fix():
    shape = memory.known_shape("flux2-dev")
    run = memory.RunShape(resolution=1024, batch=2, rank=128, optimizer="prodigy")
    with pytest.raises(budget.MemoryBudgetError) as e:
        budget.plan_memory(shape, run, 24 * memory.GiB)
    text = str(e.value)
    assert "needs about" in text and "24.00 GB" in text and "activations" in text and "To make it fit:" in text
    fixes = budget.suggest_changes(shape, run, 24 * memory.GiB)
    assert fixes[0] == "optimizer adamw8bit" and all(f in text for f in fixes)
    for fix in fixes:  # each one really fits
        changed = {"optimizer adamw8bit": run.replace(optimizer="adamw8bit"), "batch size 1": run.replace(batch=1)}.get(fix)
        if fix.startswith("LoRA rank"):
            changed = run.replace(rank=int(fix.split()[-1]))
        if fix.startswith("resolution"):
            changed = run.replace(resolution=int(fix.split()[-1]))
        if changed is not None:
            assert budget.plan_memory(shape, changed, 24 * memory.GiB).estimate.total <= 24 * memory.GiB
    # nothing single fits at 12 GB: the steps together
    together = budget.suggest_changes(shape, run.replace(batch=4), 12 * memory.GiB)
    assert len(together) == 1 and together[0].startswith("together: optimizer adamw8bit, batch size 1")


def test_refused_before_the_model_or_data_is_touched(tiny_training):
    config = tiny_training.config(**{"memory.budget_gb": 0.001, "memory.margin_gb": 0.0})
    model = _bfl()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(budget.MemoryBudgetError, match="memory budget is"):
        train_lora(config, model, DctCodec(), HashTextEncoder(width=8, pooled_width=4))
    assert not (tiny_training.out / "run").exists()  # no run folder, no cache, no config.json
    after = model.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.streamer is None


def test_known_shapes_match_the_published_sizes():
    sizes = {n: memory.known_shape(n).total_bytes / memory.GiB for n in memory.KNOWN_SHAPES}
    assert sizes["flux1-dev"] == pytest.approx(22.2, abs=0.1)
    assert sizes["flux2-dev"] == pytest.approx(60.0, abs=0.1)
    assert sizes["klein-9b"] == pytest.approx(16.9, abs=0.1)
    assert sizes["klein-4b"] == pytest.approx(7.2, abs=0.1)
    lora = memory.lora_params(memory.known_shape("flux1-dev"), memory.RunShape(rank=16, targets="all"))
    assert lora == pytest.approx(56.0e6, rel=0.01)
    fp8 = memory.known_shape("flux1-dev", weight_bytes=1)
    assert fp8.total_bytes * 2 == pytest.approx(memory.known_shape("flux1-dev").total_bytes, rel=1e-6)
    small = memory.estimate(fp8, memory.RunShape(casts_weights=True), checkpoint="blocks")
    assert small.cast_weights == fp8.double_block_bytes * 2  # one bf16 block while it recomputes


def test_shape_from_module_matches_the_known_shape_on_meta():
    """A meta-device FLUX module built from the named shape reads back the same sizes."""
    shape = memory.known_shape("klein-4b")
    read = memory.shape_from_module(_meta_flux(shape), "flux2")
    assert (read.hidden, read.double_blocks, read.single_blocks) == (3072, 5, 20)
    assert read.double_block_bytes == shape.double_block_bytes
    assert read.single_block_bytes == shape.single_block_bytes


def _meta_flux(shape: memory.ModelShape):
    from torch import nn

    def block(linears):
        m = nn.Module()
        for lin in linears:
            parent = m
            *path, leaf = lin.name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(lin.in_features, lin.out_features, bias=lin.bias, device="meta",
                                              dtype=torch.bfloat16))
        return m

    with torch.device("meta"):
        root = nn.Module()
        root.img_in = nn.Linear(128, shape.hidden, bias=False, dtype=torch.bfloat16)
        root.double_blocks = nn.ModuleList(block(shape.double_linears) for _ in range(shape.double_blocks))
        root.single_blocks = nn.ModuleList(block(shape.single_linears) for _ in range(shape.single_blocks))
        for b in root.double_blocks:
            b.register_parameter("norms", nn.Parameter(torch.ones(4 * memory.HEAD_DIM, dtype=torch.bfloat16), False))
        for b in root.single_blocks:
            b.register_parameter("norms", nn.Parameter(torch.ones(2 * memory.HEAD_DIM, dtype=torch.bfloat16), False))
    for p in root.parameters():
        p.requires_grad_(False)
    return root


# ---------------------------------------------------------------------------- config
def test_memory_config_validates_and_round_trips():
    with pytest.raises(ConfigError, match="memory.streaming"):
        MemoryConfig(streaming="sometimes")
    with pytest.raises(ConfigError, match="memory.budget_gb"):
        MemoryConfig(budget_gb=-1)
    with pytest.raises(ConfigError, match="memory.margin_gb"):
        MemoryConfig(budget_gb=1.0, margin_gb=1.0)
    cfg = TrainingConfig(memory=MemoryConfig(budget_gb=8.0, streaming="all"))
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["memory"]  # a config.json written before the section existed
    assert TrainingConfig.from_dict(old).memory == MemoryConfig()
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainingConfig.from_dict({"memory": {"budget": 8}})
    assert budget.resolve_budget(8.0, 0.5, "cpu") == 7.5 * memory.GiB
    assert budget.resolve_budget(0.0, 0.5, "cpu") == budget.UNLIMITED


# ---------------------------------------------------------------------------- CLI
def test_estimate_command_for_a_named_shape_and_a_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from trainer_core.cli import main

    assert main(["estimate", "--model", "flux1-dev", "--resolution", "512", "--budget", "8"]) == 0
    out = capsys.readouterr().out
    assert "flux1-dev: 19+38 blocks, hidden 3072, 22.2 GB" in out
    assert "of 57 blocks streamed, block checkpointing" in out and "LoRA + grads + optimizer" in out
    sd = {"img_in.weight": torch.zeros(256, 64, dtype=torch.bfloat16), "txt_in.weight": torch.zeros(256, 64),
          "guidance_in.in_layer.weight": torch.zeros(256, 256)}
    for i in range(2):
        sd[f"double_blocks.{i}.img_attn.qkv.weight"] = torch.zeros(768, 256, dtype=torch.float8_e4m3fn)
    for i in range(3):
        sd[f"single_blocks.{i}.linear1.weight"] = torch.zeros(1792, 256, dtype=torch.float8_e4m3fn)
    path = tmp_path / "tiny_flux.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert main(["estimate", "--model", str(path), "--resolution", "256", "--budget", "0"]) == 0
    out = capsys.readouterr().out
    assert "tiny_flux: 2+3 blocks, hidden 256" in out and "0 of 5 blocks streamed, no checkpointing" in out
    assert "cast weights" in out
    assert main(["estimate", "--model", "flux2-dev", "--resolution", "1024", "--batch", "8", "--budget", "4"]) == 0
    assert "REFUSED" in capsys.readouterr().out
