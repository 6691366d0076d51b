"""The nodes' pure logic (``nodes/specs.py``), the example workflows' two formats and the
web extension's syntax, all without ComfyUI.

``nodes/specs.py`` is loaded by file path: importing the ``nodes`` package would need
ComfyUI, and the name ``nodes`` is also ComfyUI's own module."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from pack_modules import ROOT, load_by_path

from trainer_core.config import ConfigError, LoRAConfig, PreviewConfig
from trainer_core.fingerprint import tensor_fingerprint



specs = load_by_path("flowtrain_node_specs", ROOT / "nodes" / "specs.py")
builder = load_by_path("flowtrain_build_workflows", ROOT / "scripts" / "build_example_workflows.py")

# Widget inputs of the core nodes the examples use, in schema order (checked against the
# real schemas by tests/comfyui/test_workflows.py). "+control" = the UI-only
# control_after_generate value the frontend adds after a seed.
CORE_WIDGETS = {
    "UNETLoader": ("unet_name", "weight_dtype"),
    "DualCLIPLoader": ("clip_name1", "clip_name2", "type", "device"),
    "CLIPLoader": ("clip_name", "type", "device"),
    "VAELoader": ("vae_name",),
    "CLIPTextEncode": ("text",),
    "FluxGuidance": ("guidance",),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "EmptyFlux2LatentImage": ("width", "height", "batch_size"),
    "KSampler": ("seed", "+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "VAEDecode": (),
    "SaveImage": ("filename_prefix",),
    "LoadImage": ("image", "+upload"),
    "VAEEncode": (),
    "ReferenceLatent": (),
}


def dataset(tmp_path) -> specs.DatasetSpec:
    return specs.DatasetSpec(path=str(tmp_path), image_count=3, caption_count=2, samples_per_epoch=5)


# ----------------------------------------------------------------------------- parsing
def test_parse_lists_and_prompts():
    assert specs.parse_int_list("512, 768 1024", "resolutions") == (512, 768, 1024)
    assert specs.parse_float_list("0, 0.5,1.0", "strengths") == (0.0, 0.5, 1.0)
    assert specs.parse_prompts("a cat\n\n  a dog  \n") == ("a cat", "a dog")
    with pytest.raises(ValueError, match="resolutions"):
        specs.parse_int_list("512, big", "resolutions")
    with pytest.raises(ValueError, match="empty"):
        specs.parse_int_list(" , ", "resolutions")
    with pytest.raises(ValueError, match="non-finite"):
        specs.parse_float_list("1, nan", "strengths")


@pytest.mark.parametrize("name, expected", [("my_lora", "my_lora.safetensors"), ("x.safetensors", "x.safetensors"),
                                            ("  a b  ", "a b.safetensors")])
def test_safe_lora_filename_accepts(name, expected):
    assert specs.safe_lora_filename(name) == expected


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a\\b", "/abs/path", "..", ".hidden", "c:evil", "a..b"])
def test_safe_lora_filename_rejects(name):
    with pytest.raises(ValueError, match="plain file name"):
        specs.safe_lora_filename(name)


def test_resolve_dataset_path(tmp_path):
    inp = tmp_path / "input"
    (inp / "faces").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    assert specs.resolve_dataset_path("faces", str(inp)) == (inp / "faces").resolve()
    assert specs.resolve_dataset_path(str(tmp_path / "outside"), str(inp)) == tmp_path / "outside"
    with pytest.raises(ValueError, match="leaves ComfyUI's input folder"):
        specs.resolve_dataset_path("../outside", str(inp))
    with pytest.raises(ValueError, match="does not exist"):
        specs.resolve_dataset_path("missing", str(inp))
    with pytest.raises(ValueError, match="empty"):
        specs.resolve_dataset_path("  ", str(inp))


def test_resolve_precision():
    assert specs.resolve_precision("auto", "torch.float32") == "fp32"
    assert specs.resolve_precision("auto", "float16") == "fp16"
    assert specs.resolve_precision("auto", "bfloat16") == "bf16"
    assert specs.resolve_precision("fp16", "float32") == "fp16"
    with pytest.raises(ValueError, match="precision"):
        specs.resolve_precision("fp64", "float32")


def test_trigger_variants():
    assert specs.trigger_variants("a photo of a dog", "sks") == ("sks, a photo of a dog", "a photo of a dog")
    with_t, without = specs.trigger_variants("a photo of sks dog", "sks")
    assert with_t == "a photo of sks dog" and "sks" not in without and "dog" in without
    assert specs.trigger_variants("a cat", "") == ("a cat", "a cat")


def test_tensor_fingerprint_tells_weights_apart():
    a = [("w", torch.arange(1000.0).reshape(10, 100))]
    b = [("w", torch.arange(1000.0).reshape(10, 100) * 1.5)]
    assert tensor_fingerprint(a) == tensor_fingerprint([("w", a[0][1].clone())])
    assert tensor_fingerprint(a) != tensor_fingerprint(b)
    assert tensor_fingerprint(a) != tensor_fingerprint([("v", a[0][1])])


# ----------------------------------------------------------------------------- config building
def test_build_training_config_maps_every_widget(tmp_path):
    ds = dataset(tmp_path).with_captions(specs.CaptionConfig(trigger_word="sks", class_word="man", shuffle=True))
    settings = specs.TrainerSettings(preset="none", steps=7, learning_rate=3e-4, optimizer="adamw", batch_size=2,
                                     seed=5, save_every=3, output_name="run1")
    cfg = specs.build_training_config(ds, LoRAConfig(rank=4, alpha=2.0), settings, output_dir=str(tmp_path / "out"),
                                      compute_dtype="bfloat16", model_file="flux.safetensors",
                                      preview=specs.PreviewSettings(PreviewConfig(every_n_steps=2, prompts=("a",)))).config
    assert (cfg.train.steps, cfg.train.seed, cfg.train.precision, cfg.train.save_every) == (7, 5, "bf16", 3)
    assert (cfg.train.output_dir, cfg.train.output_name) == (str(tmp_path / "out"), "run1")
    assert cfg.train.gradient_checkpointing == "auto"  # the node's default: ComfyUI knows the free memory
    assert (cfg.optim.lr, cfg.optim.optimizer) == (3e-4, "adamw")
    assert cfg.data.batch_size == 2 and cfg.data.path == str(tmp_path)
    assert cfg.data.captions.trigger_word == "sks" and cfg.data.captions.shuffle
    assert cfg.lora.rank == 4 and cfg.preview.every_n_steps == 2 and not cfg.dop.enabled
    assert (cfg.model.preset, cfg.model.file) == ("none", "flux.safetensors")


def test_memory_budget_widget_maps_to_the_memory_config(tmp_path):
    from trainer_core.config import MemoryConfig

    assert specs.memory_config("auto") == MemoryConfig()
    assert specs.memory_config("12 GB") == MemoryConfig(budget_gb=12.0)
    unlimited = specs.memory_config("unlimited")
    assert unlimited.streaming == "off" and unlimited.budget_gb >= 1000
    with pytest.raises(ValueError, match="memory_budget"):
        specs.memory_config("7 GB")
    cfg = specs.build_training_config(dataset(tmp_path), LoRAConfig(), specs.TrainerSettings(memory_budget="8 GB"),
                                      output_dir=str(tmp_path)).config
    assert cfg.memory.budget_gb == 8.0
    assert all(choice == "auto" or choice == "unlimited" or choice.endswith(" GB") for choice in specs.MEMORY_BUDGETS)


@pytest.mark.parametrize("change, field", [({"learning_rate": 0.0}, "optim.lr"), ({"output_name": "../x"}, "train.output_name"),
                                           ({"optimizer": "sgd"}, "optim.optimizer"), ({"steps": 0}, "train.steps"),
                                           ({"preset": "nope"}, "model.preset"),
                                           ({"output_name": "a\x00b"}, "train.output_name"),
                                           ({"batch_size": 1.5}, "data.batch_size")])
def test_build_training_config_errors_name_the_widget_and_the_field(tmp_path, change, field):
    settings = specs.TrainerSettings(**change)
    widget = next(iter(change))
    with pytest.raises(ConfigError, match=rf"^the Trainer's {widget} widget: {field.replace('.', r'[.]')}"):
        specs.build_training_config(dataset(tmp_path), LoRAConfig(), settings, output_dir=str(tmp_path))


def test_every_trainer_widget_maps_to_a_config_field():
    import dataclasses

    from trainer_core.config import TrainingConfig, field_names

    assert set(specs.TRAINER_WIDGET_FIELDS) <= {f.name for f in dataclasses.fields(specs.TrainerSettings)}
    assert set(specs.TRAINER_WIDGET_FIELDS.values()) <= set(field_names(TrainingConfig))


def test_dop_needs_a_trigger(tmp_path):
    dop = specs.DopSettings(specs.DopConfig(enabled=True, class_word="man"))
    with pytest.raises(ConfigError, match="trigger_word"):
        specs.build_training_config(dataset(tmp_path), LoRAConfig(), specs.TrainerSettings(), output_dir=str(tmp_path),
                                    dop=dop)


def test_preview_settings_map_validation_every(tmp_path):
    widgets = dict(every_n_steps=3, prompts="a cat\n\n a dog ", seed=4, steps=5, width=64, height=80, guidance=2.0)
    p = specs.preview_settings(**widgets, validation_every=7)
    assert p.config == PreviewConfig(every_n_steps=3, prompts=("a cat", "a dog"), seed=4, steps=5, width=64, height=80,
                                     guidance=2.0)
    cfg = specs.build_training_config(dataset(tmp_path), LoRAConfig(), specs.TrainerSettings(), output_dir=str(tmp_path),
                                      preview=p).config
    assert cfg.validation.every_n_steps == 7 and cfg.preview == p.config
    off = specs.build_training_config(dataset(tmp_path), LoRAConfig(), specs.TrainerSettings(), output_dir=str(tmp_path),
                                      preview=specs.preview_settings(**widgets)).config
    assert off.validation.every_n_steps == 0
    assert specs.build_training_config(dataset(tmp_path), LoRAConfig(), specs.TrainerSettings(),
                                       output_dir=str(tmp_path)).config.validation.every_n_steps == 0
    with pytest.raises(ConfigError, match=r"validation\.every_n_steps"):
        specs.preview_settings(**widgets, validation_every=-1)


def test_unfinished_run_marker(tmp_path):
    assert specs.unfinished_run_marker(tmp_path / "none") == ""
    state = tmp_path / "training_state.json"
    state.write_text(json.dumps({"status": "finished", "step": 4, "total_steps": 4}))
    assert specs.unfinished_run_marker(tmp_path) == ""
    state.write_text(json.dumps({"status": "stopped (.stop file)", "step": 2, "total_steps": 4}))
    assert specs.unfinished_run_marker(tmp_path) == "unfinished:stopped (.stop file):2/4"
    state.write_text("{not json")
    assert specs.unfinished_run_marker(tmp_path).startswith("unreadable")


def test_dataset_spec_keeps_its_caption_extension(tmp_path):
    ds = specs.DatasetSpec(path=str(tmp_path), image_count=3, caption_count=2, samples_per_epoch=5, caption_extension=".cap")
    ds2 = ds.with_captions(specs.CaptionConfig(trigger_word="sks"))
    assert ds2.captions.caption_extension == ".cap" and ds2.captions.trigger_word == "sks"
    assert ds.captions.trigger_word == ""  # frozen values: the input is never changed
    assert "3 images, 2 captions, 5 samples" in ds.describe() and "1 without a caption" in ds.describe()


def test_lora_tensors_is_a_dict_with_metadata():
    t = specs.LoraTensors({"a": torch.zeros(1)}, {"k": "v"})
    assert isinstance(t, dict) and list(t) == ["a"] and t.metadata == {"k": "v"}


def test_trainer_widgets_match_settings_fields():
    import dataclasses

    assert specs.NODE_WIDGETS["FlowTrainTrainer"] == tuple(f.name for f in dataclasses.fields(specs.TrainerSettings))


# ----------------------------------------------------------------------------- loss curve
def test_loss_curve_image():
    from trainer_core.plot import image_to_array, loss_curve_image

    arr = image_to_array(loss_curve_image([{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(30)], width=200, height=100))
    assert arr.shape == (100, 200, 3) and arr.dtype.name == "float32" and 0.0 <= arr.min() and arr.max() <= 1.0
    assert (arr < 0.5).any()  # something was drawn
    empty = image_to_array(loss_curve_image([], width=64, height=48))
    assert empty.shape == (48, 64, 3)


# ----------------------------------------------------------------------------- workflows
def _widget_names(node_type: str) -> tuple[str, ...]:
    names = specs.NODE_WIDGETS.get(node_type) or CORE_WIDGETS.get(node_type)
    assert names is not None, f"no widget list for {node_type}; add it to CORE_WIDGETS"
    return names


@pytest.mark.parametrize("name", sorted(builder.WORKFLOWS))
def test_workflow_formats_are_in_step(name):
    ui = json.loads((ROOT / "example_workflows" / f"{builder.TITLES[name]}.json").read_text())
    api = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in builder.UI_ONLY}
    assert set(ui_nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for nid, node in api.items():
        u = ui_nodes[nid]
        assert u["type"] == node["class_type"]
        names = _widget_names(u["type"])
        expected = [node["inputs"][n] if not n.startswith("+") else None for n in names]
        got = u["widgets_values"]
        assert len(got) == len(expected), (nid, u["type"], got, names)
        for n, e, g in zip(names, expected, got):
            if n == "+control":
                assert g in ("fixed", "increment", "decrement", "randomize")
            elif n == "+upload":  # LoadImage's upload button keeps the value "image"
                assert g == "image"
            else:
                assert e == g, (nid, u["type"], n)
        sockets = {k: v for k, v in node["inputs"].items() if isinstance(v, list)}
        ui_sockets = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in u["inputs"] if i["link"]}
        assert sockets == ui_sockets, (nid, u["type"])
    assert any(n["type"] == "MarkdownNote" and "models/" in n["widgets_values"][0] for n in ui["nodes"])


def test_workflow_files_are_what_the_builder_writes(tmp_path):
    builder.main(tmp_path)
    for path in sorted(tmp_path.rglob("*.json")):
        rel = path.relative_to(tmp_path)
        assert (ROOT / "example_workflows" / rel).read_text() == path.read_text(), f"rerun the builder: {rel}"


# ----------------------------------------------------------------------------- web extension
@pytest.mark.skipif(shutil.which("node") is None, reason="node.js is not installed")
def test_web_extension_parses():
    source = (ROOT / "web" / "flowtrain.js").read_text()
    done = subprocess.run(["node", "--input-type=module", "--check"], input=source, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert "flowtrain.progress" in source and "registerExtension" in source


def test_dataset_spec_counts_skipped_and_ignored_files_and_carries_strict(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks")
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "layers.psd").write_bytes(b"8BPS")
    (tmp_path / "0_off").mkdir()
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "0_off" / "b.png")
    spec = specs.dataset_spec(tmp_path, ".txt")
    assert (spec.image_count, spec.unreadable_count, spec.ignored_count) == (1, 1, 2)
    assert "1 unreadable image(s) skipped" in spec.describe() and "2 other file(s) ignored" in spec.describe()
    assert spec.data_config(1).strict is False
    with pytest.raises(ValueError, match=r"(?s)data\.strict is on.*broken\.png: the file is empty"):
        specs.dataset_spec(tmp_path, ".txt", strict=True)
