"""Per-variant presets (presets.py): one per known variant, valid config values, the origin
guide's numbers, and the user's explicit fields win."""
from __future__ import annotations

import pytest

from trainer_core.config import TrainingConfig
from trainer_core.models.variants import VARIANTS
from trainer_core.presets import PRESETS, apply_preset


def test_every_known_variant_has_a_preset_and_the_fallbacks_none():
    assert set(PRESETS) == {name for name, v in VARIANTS.items() if v.shape is not None}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    cfg = apply_preset(TrainingConfig(), PRESETS[name])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (PRESETS[name].rank, float(PRESETS[name].rank), 1e-4)
    assert cfg.dop.every_n_steps == PRESETS[name].dop_every_n_steps


def test_guide_values():
    # FLUX.2 guide: DOP every 1-2 (Klein 4B), 4 (Klein 9B), 8 (dev); dev at rank 32 with attention targets
    assert [PRESETS[n].dop_every_n_steps for n in ("klein-4b", "klein-9b", "flux2-dev")] == [1, 4, 8]
    assert (PRESETS["flux2-dev"].rank, PRESETS["flux2-dev"].targets) == (32, "attention")
    assert {(p.sigma_scheme, p.weighting) for n, p in PRESETS.items() if n.startswith(("klein", "flux2"))} == {
        ("balanced", "bell_shaped")}
    assert (PRESETS["flux1-dev"].sigma_scheme, PRESETS["flux1-dev"].shift, PRESETS["flux1-dev"].guidance) == (
        "shift", 3.1582, 1.0)


def test_explicit_fields_win():
    user = TrainingConfig.from_dict({"lora": {"rank": 4}, "optim": {"lr": 3e-4}})
    cfg = apply_preset(user, PRESETS["flux2-dev"], explicit={"lora.rank", "optim.lr"})
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (4, 4.0, 3e-4)  # alpha follows the user's rank
    assert (cfg.flow.sigma_scheme, cfg.dop.every_n_steps) == ("balanced", 8)
    kept = apply_preset(TrainingConfig.from_dict({"lora": {"alpha": 1.0}}), PRESETS["klein-4b"], explicit={"lora.alpha"})
    assert (kept.lora.rank, kept.lora.alpha) == (16, 1.0)


def test_the_engine_applies_model_preset_auto_to_a_run(tmp_path):
    """``model.preset='auto'`` in a config (the command line, a node's config.json): the run
    detects the model (here a tiny FLUX.1-schnell: same block and width ratios, no guidance)
    and its config.json records the preset's values; what the config set itself stays."""
    import json

    import torch
    from diffusers import FluxTransformer2DModel

    from tiny_run import make_config, train, write_data
    from trainer_core.models.diffusers_flux import DiffusersFlux1

    torch.manual_seed(0)
    module = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=3, joint_attention_dim=64,
                                    pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), guidance_embeds=False)
    config = make_config(write_data(tmp_path / "data"), steps=1, model={"preset": "auto"}, optim={"lr": 3e-4})
    train(config, tmp_path / "run", model=DiffusersFlux1(module))
    doc = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert doc["model"]["preset"] == doc["model"]["variant"] == "flux1-schnell"
    assert (doc["flow"]["sigma_scheme"], doc["flow"]["shift"], doc["lora"]["targets"]) == ("shift", 3.1582, "all")
    assert doc["optim"]["lr"] == 3e-4  # set by the config: kept
