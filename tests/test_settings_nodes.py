"""Every config field is reachable from the graph (a node widget) or listed as engine-only
with a reason; the settings nodes' widgets come from the config metadata; presets fill only
untouched fields; the node's config round-trips through config.json; example workflow nodes
do not overlap. All without ComfyUI (``nodes/specs.py`` and ``nodes/settings.py`` by path)."""
from __future__ import annotations

import dataclasses
import json

import pytest
from pack_modules import ROOT, load_by_path

from trainer_core.config import ConfigError, LoRAConfig, TrainingConfig, field_names
from trainer_core.models.variants import VARIANTS, ModelShape, detect_variant
from trainer_core.presets import PRESETS



specs = load_by_path("flowtrain_node_specs_s", ROOT / "nodes" / "specs.py")
settings = specs.sibling("settings")
GROUP = {g.node_id: g for g in settings.GROUPS}


def dataset(tmp_path):
    return specs.DatasetSpec(path=str(tmp_path), image_count=3, caption_count=3, samples_per_epoch=3)


def build(tmp_path, **kw):
    trainer = kw.pop("trainer", specs.TrainerSettings())
    lora = kw.pop("lora", LoRAConfig())
    return specs.build_training_config(dataset(tmp_path), lora, trainer, output_dir=str(tmp_path / "out"), **kw)


# ----------------------------------------------------------------------------- coverage
def test_every_config_field_is_set_by_a_node_or_engine_only_with_a_reason():
    sources = settings.field_sources(specs.TRAINER_WIDGET_FIELDS)
    every = set(field_names(TrainingConfig))
    missing = sorted(every - set(sources) - set(settings.ENGINE_ONLY))
    assert not missing, f"config fields no node sets and not in ENGINE_ONLY: {missing}"
    assert not set(sources) - every, "a widget maps to a field the config does not have"
    assert not set(settings.ENGINE_ONLY) & set(sources), "an engine-only field is also a widget"
    assert all(len(reason) > 20 for reason in settings.ENGINE_ONLY.values())
    doubled = {f: s for f, s in sources.items() if len(s) > 1}
    assert not doubled, f"fields set by two widgets: {doubled}"


def test_node_widget_lists_match_the_groups():
    for g in settings.GROUPS:
        assert specs.NODE_WIDGETS[g.node_id] == tuple(g.widgets())
    assert set(specs.NODE_WIDGETS["FlowTrainTrainer"]) == set(specs.TRAINER_WIDGET_FIELDS)
    assert len(specs.NODE_WIDGETS["FlowTrainTrainer"]) <= 10  # the rarer options moved to settings nodes


def test_widgets_come_from_the_config_metadata():
    for g in settings.GROUPS:
        for w in settings.widget_specs(g):
            f = settings.config_field(w.field)
            assert f.metadata["help"] in w.tooltip and w.field in w.tooltip
            if f.metadata.get("choices"):
                assert w.kind == "COMBO" and list(w.options) == f.metadata["choices"]()
                assert w.default in w.options
            bounds = dict(w.bounds)
            if f.metadata.get("lo") is not None and w.kind in ("INT", "FLOAT"):
                assert bounds["min"] == f.metadata["lo"] and bounds["max"] == f.metadata["hi"]
            value = settings.widget_value(w.field, w.default)
            assert value == settings.node_default(w.field)


# ----------------------------------------------------------------------------- settings values
def test_a_settings_node_at_its_defaults_changes_nothing(tmp_path):
    for g in settings.GROUPS:
        widgets = {w.name: w.default for w in settings.widget_specs(g)}
        assert settings.settings_values(g, widgets).values == ()
    # the frontend shows 2/3 rounded to the widget's precision: still the default
    assert settings.settings_values(GROUP["FlowTrainEmaSettings"], {"power": 0.667}).values == ()


NON_DEFAULT = {
    "FlowTrainLossSettings": {"min_snr_gamma": 5.0, "loss_type": "huber", "noise_offset": 0.05},
    "FlowTrainOptimizerSettings": {"warmup_steps": 20, "betas": "0.9, 0.99", "loraplus_lr_ratio": 16.0},
    "FlowTrainEmaSettings": {"enabled": True, "decay": 0.99},
    "FlowTrainAugmentSettings": {"flip": True, "tag_dropout": 0.1, "flip_opt_out_words": "left, right"},
    "FlowTrainMemorySettings": {"gradient_checkpointing": "off", "precision": "fp32"},
    "FlowTrainRunSettings": {"log_every": 3, "validation_sigmas": "0.5", "validation_seed": 9},
}


def test_each_group_reaches_the_config_through_a_chain(tmp_path):
    chain = None
    for node_id, widgets in NON_DEFAULT.items():
        chain = settings.settings_values(GROUP[node_id], widgets, chain)
    cfg = build(tmp_path, extra=chain, trainer=specs.TrainerSettings(preset="none")).config
    assert (cfg.loss.min_snr_gamma, cfg.loss.loss_type, cfg.flow.noise_offset) == (5.0, "huber", 0.05)
    assert (cfg.optim.warmup_steps, cfg.optim.betas, cfg.optim.loraplus_lr_ratio) == (20, (0.9, 0.99), 16.0)
    assert cfg.ema.enabled and cfg.ema.decay == 0.99
    assert cfg.data.augment.flip and cfg.data.captions.tag_dropout == 0.1
    assert cfg.data.augment.flip_opt_out_words == ("left", "right")
    assert (cfg.train.gradient_checkpointing, cfg.train.precision) == ("off", "fp32")
    assert (cfg.train.log_every, cfg.validation.sigmas, cfg.validation.seed) == (3, (0.5,), 9)
    assert len(chain.sources) == len(NON_DEFAULT)


def test_a_later_settings_node_wins_and_bad_values_name_the_node_and_field():
    loss = GROUP["FlowTrainLossSettings"]
    first = settings.settings_values(loss, {"min_snr_gamma": 5.0})
    second = settings.settings_values(loss, {"min_snr_gamma": 3.0}, first)
    assert second.as_dict()["loss.min_snr_gamma"] == 3.0 and first.as_dict()["loss.min_snr_gamma"] == 5.0
    with pytest.raises(ConfigError, match=r"FlowTrain Loss & Noise: loss\.min_snr_gamma=-1"):
        settings.settings_values(loss, {"min_snr_gamma": -1.0})
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        settings.settings_values(GROUP["FlowTrainOptimizerSettings"], {"betas": "0.9"})
    with pytest.raises(ValueError, match="unknown widget"):
        settings.settings_values(loss, {"nope": 1})


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_auto_preset_applies_the_detected_variants_defaults(tmp_path, name):
    variant = detect_variant(VARIANTS[name].shape).variant.name  # the real shape
    built = build(tmp_path, variant=variant, variant_label=VARIANTS[name].label)
    cfg, p = built.config, PRESETS[name]
    assert (cfg.model.preset, cfg.model.variant) == (name, name)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (p.rank, float(p.rank), p.targets)
    assert (cfg.flow.sigma_scheme, cfg.flow.weighting, cfg.dop.every_n_steps) == (p.sigma_scheme, p.weighting,
                                                                                   p.dop_every_n_steps)
    assert built.preset_line.startswith(f"preset: {VARIANTS[name].label} — rank {p.rank}, lr 1e-4")


def test_scaled_down_shapes_pick_the_same_preset(tmp_path):
    # tiny test models keep the real depth (single/double) and width (context/hidden) ratios
    tiny = {"klein-4b": ModelShape("flux2", 128, 1, 4, 320, False), "klein-9b": ModelShape("flux2", 128, 1, 3, 384, False),
            "flux2-dev": ModelShape("flux2", 128, 1, 6, 320, True), "flux1-dev": ModelShape("flux1", 96, 1, 2, 128, True),
            "flux1-schnell": ModelShape("flux1", 96, 1, 2, 128, False)}
    for name, shape in tiny.items():
        found = detect_variant(shape)
        assert (found.variant.name, found.how) == (name, "ratios")
        assert build(tmp_path, variant=found.variant.name).config.model.preset == name


def test_what_the_user_changed_wins_over_the_preset(tmp_path):
    loss = settings.settings_values(GROUP["FlowTrainLossSettings"], {"sigma_scheme": "uniform"})
    built = build(tmp_path, lora=LoRAConfig(rank=8), extra=loss, variant="flux2-dev")
    cfg = built.config
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.flow.sigma_scheme) == (8, 8.0, "uniform")
    assert (cfg.flow.weighting, cfg.dop.every_n_steps) == ("bell_shaped", 8)  # untouched: the preset's
    assert "yours: flow.sigma_scheme, lora.rank" in built.preset_line


def test_preset_none_named_and_unknown_size(tmp_path):
    none = build(tmp_path, trainer=specs.TrainerSettings(preset="none"), variant="klein-9b").config
    assert (none.lora.rank, none.flow.sigma_scheme, none.model.preset) == (16, "sigmoid", "none")
    named = build(tmp_path, trainer=specs.TrainerSettings(preset="flux2-dev"), variant="klein-4b").config
    assert (named.lora.rank, named.model.preset, named.model.variant) == (32, "flux2-dev", "klein-4b")
    unknown = build(tmp_path, variant="flux2")  # a FLUX.2 of no known size: no preset
    assert unknown.config.model.preset == "none" and unknown.preset_line.startswith("preset: none")


# ----------------------------------------------------------------------------- config.json
def test_the_nodes_config_round_trips_through_config_json(tmp_path):
    chain = None
    for node_id, widgets in NON_DEFAULT.items():
        chain = settings.settings_values(GROUP[node_id], widgets, chain)
    cfg = build(tmp_path, extra=chain, variant="klein-4b", model_file="flux-2-klein-base-4b.safetensors").config
    doc = json.loads(json.dumps({"format_version": 1, "config": cfg.to_dict()}))  # as session writes it
    again = TrainingConfig.from_dict(doc["config"])
    assert again == cfg
    assert again.model.file == "flux-2-klein-base-4b.safetensors" and again.train.precision in ("bf16", "fp16", "fp32")


def test_old_config_json_checkpointing_bools_stillload_by_path():
    assert TrainingConfig.from_dict({"train": {"gradient_checkpointing": True}}).train.gradient_checkpointing == "blocks"
    assert TrainingConfig.from_dict({"train": {"gradient_checkpointing": False}}).train.gradient_checkpointing == "off"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainingConfig.from_dict({"train": {"gradient_checkpointing": "sometimes"}})


# ----------------------------------------------------------------------------- workflows
def test_example_workflow_nodes_do_not_overlap():
    builder = load_by_path("flowtrain_build_workflows_s", ROOT / "scripts" / "build_example_workflows.py")
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        nodes = json.loads(path.read_text())["nodes"]
        for a in nodes:
            estimate = builder.node_size(builder.N(a["id"], a["type"], dict.fromkeys(
                range(len(a["widgets_values"]))), {i["name"]: None for i in a["inputs"]}))
            assert a["size"][1] >= min(estimate[1], 380) - 26 * 3, (path.name, a["type"])  # room for the widgets
        overlaps = [(a["id"], b["id"]) for a in nodes for b in nodes if a["id"] < b["id"]
                    and a["pos"][0] < b["pos"][0] + b["size"][0] and b["pos"][0] < a["pos"][0] + a["size"][0]
                    and a["pos"][1] < b["pos"][1] + b["size"][1] and b["pos"][1] < a["pos"][1] + a["size"][1]]
        assert not overlaps, (path.name, overlaps)


def test_each_template_has_a_readable_title_and_a_thumbnail():
    from PIL import Image

    builder = load_by_path("flowtrain_build_workflows_t", ROOT / "scripts" / "build_example_workflows.py")
    ui_files = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    assert ui_files == sorted(builder.TITLES.values())
    for title in ui_files:
        assert " " in title and "_" not in title  # the template browser shows the file name as the title
        with Image.open(ROOT / "example_workflows" / f"{title}.jpg") as image:  # ComfyUI asks for <name>.jpg
            assert image.format == "JPEG" and image.size[0] >= 256


def test_docs_name_every_settings_node_and_widget():
    text = (ROOT / "docs" / "nodes.md").read_text()
    for g in settings.GROUPS:
        assert g.node_id in text and g.title.removeprefix("FlowTrain ") in text
        missing = [w for w in g.widgets() if w not in text]
        assert not missing, (g.node_id, missing)
    assert all(f"`{dotted}`" in text for dotted in settings.ENGINE_ONLY)
