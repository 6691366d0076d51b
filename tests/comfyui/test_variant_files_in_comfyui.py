"""Every LoRA algorithm on ComfyUI's own tiny FLUX.1/FLUX.2 modules: the saved file through
core LoraLoader equals the trained model, our reader reproduces it, training lowers the loss,
and continuing from a file in each key form starts exactly at the file."""
from __future__ import annotations

import pytest
import harness
import torch
from test_bridge import EXPECTED, _batch, _loss, _train

from trainer_core.config import LoRAConfig, TrainingConfig
from trainer_core.lora import records as lora_records
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.network import LoraNetwork
from trainer_core.models.bfl_flux import BflFlux
from trainer_core.session import check_adapter, seeded_inject

ALGORITHMS = ["lora", "dora", "loha", "lokr"]


def _perturb(net, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _velocity_through_comfy(bridge, mp, model, tensors, batch):
    import comfy.model_management as mm

    with_lora = bridge.model_with_lora(mp, tensors)  # raises on any key ComfyUI did not load
    with torch.inference_mode():
        mm.load_models_gpu([with_lora], force_full_load=True)
        again = BflFlux(with_lora.model.diffusion_model, arch=model.arch, guidance_embed=model.guidance_embed,
                        latent_channels=model.latent_channels, patch_size=model.patch_size,
                        context_tokens=model.context_tokens)
        return again.velocity(batch[0], batch[1], batch[2], 1.0), len(with_lora.patches)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_file_through_loraloader_equals_trained_model(comfyui, bridge, tiny_files, name, algorithm):
    mp = comfyui.load_flux(tiny_files[name])
    batch = _batch(EXPECTED[name][0], seed=5)
    cfg = LoRAConfig(rank=4, alpha=8.0, algorithm=algorithm)
    with bridge.training_model(mp, harness.bridge_config(False)) as model:
        net = LoraNetwork.inject(model.module, cfg, model.default_targets["all"])
        _perturb(net)
        with torch.no_grad():
            live = model.velocity(batch[0], batch[1], batch[2], 1.0)
            base = None
            with net.disabled():
                base = model.velocity(batch[0], batch[1], batch[2], 1.0)
        tensors = LORA_FORMATS.get(model.lora_format).to_tensors(net, model)
        trained = len(net.modules_trained())
        net.remove()
        # our reader: a new network set from the file predicts the same (engine save -> load)
        net2 = LoraNetwork.inject(model.module, cfg, model.default_targets["all"])
        net2.load_records(lora_records.module_records(model.module, model.bfl_name, lora_records.decode(tensors)))
        with torch.no_grad():
            reread = model.velocity(batch[0], batch[1], batch[2], 1.0)
        net2.remove()
    assert (live - base).abs().max() > 1e-3 * live.abs().max()  # the adapter is live
    assert (reread - live).abs().max() <= 1e-5
    from_file, patches = _velocity_through_comfy(bridge, mp, model, tensors, batch)
    assert patches == trained
    rel = float((from_file - live).abs().max() / live.abs().max())
    assert rel <= 1e-3, rel


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
@pytest.mark.parametrize("name", ["flux1_dev", "flux2"])
def test_short_training_lowers_the_loss(comfyui, bridge, tiny_files, name, algorithm):
    mp = comfyui.load_flux(tiny_files[name])
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        losses = _train(model, lora=LoRAConfig(rank=4, alpha=4.0, algorithm=algorithm))
    assert losses[-1] < losses[0], losses


def _diffusers_lora(rank=2, d=128, mlp=512, seed=0) -> dict:
    """A FLUX.1 LoRA on diffusers' split names (``transformer.*``, peft lora_A/lora_B, no alpha)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"transformer_blocks.0.attn.{n}": (d, d) for n in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    shapes.update({f"single_transformer_blocks.0.attn.{n}": (d, d) for n in ("to_q", "to_k", "to_v")})
    shapes["single_transformer_blocks.0.proj_mlp"] = (mlp, d)
    shapes["single_transformer_blocks.0.proj_out"] = (d, d + mlp)
    out = {}
    for n, (o, i) in shapes.items():
        out[f"transformer.{n}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.1
        out[f"transformer.{n}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
    return out


@pytest.mark.parametrize("form", ["ours", "kohya", "transformer", "diffusion_model"])
def test_continuing_from_a_file_starts_at_its_predictions(comfyui, bridge, tiny_files, tmp_path, form):
    from trainer_core.lora import io as lora_io

    mp = comfyui.load_flux(tiny_files["flux1_dev"])
    batch = _batch("flux1", seed=7)
    rank, alpha = 2, 2.0
    with bridge.training_model(mp, harness.bridge_config(False)) as model:
        if form == "transformer":
            tensors, md = _diffusers_lora(rank), {}
        else:
            cfg = LoRAConfig(rank=rank, alpha=alpha, targets="attention")
            net = LoraNetwork.inject(model.module, cfg, model.default_targets["attention"])
            _perturb(net, std=0.1)
            recs = lora_records.bfl_records(net, model)
            net.remove()
            tensors = lora_records.encode(recs, "flux2_diffusion_model" if form == "diffusion_model" else "flux1_kohya")
            md = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)} if form == "ours" else {}
        path = tmp_path / f"{form}.safetensors"
        lora_io.save_lora_file(str(path), tensors, md)
        config = TrainingConfig.from_dict({"lora": {"rank": rank, "alpha": alpha, "targets": "attention",
                                                    "init_from": str(path)}})
        net = seeded_inject(config, model, check_adapter(config, model))
        with torch.no_grad():
            continued = model.velocity(batch[0], batch[1], batch[2], 1.0)
            with net.disabled():
                base = model.velocity(batch[0], batch[1], batch[2], 1.0)
        net.remove()
    from_file, _ = _velocity_through_comfy(bridge, mp, model, tensors, batch)
    assert (from_file - base).abs().max() > 1e-3  # the file changes the model
    assert (continued - from_file).abs().max() <= 1e-5


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
def test_fp8_base_weights_train_with_every_algorithm(comfyui, bridge, tiny_files, algorithm):
    mp = comfyui.load_flux(tiny_files["flux1_dev"], dtype=torch.float8_e4m3fn)
    with bridge.training_model(mp, harness.bridge_config(True)) as model:
        qkv = model.module.double_blocks[0].img_attn.qkv.weight
        losses = _train(model, lora=LoRAConfig(rank=4, alpha=4.0, algorithm=algorithm))  # asserts fp32 adapter params
        assert qkv.dtype == torch.float8_e4m3fn
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
