"""Cheap checks come before expensive work: the command line rejects a bad data folder,
run name or config value before it loads a model, config type errors name the field, the
expected type and an example (never a traceback), and a run that fails validation leaves
no run folder behind."""
from __future__ import annotations

import logging

import pytest

import trainer_core.models.local as local
from trainer_core import cli
from trainer_core.config import ConfigError, TrainingConfig


@pytest.fixture
def no_model_load(monkeypatch):
    """The model loader fails the test if reached; Ctrl+C handling stays pytest's."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(local, "load_diffusers_flux_folder", load)
    monkeypatch.setattr(cli.StopFlag, "install", lambda self: None)


def _train(tmp_path, data, *extra) -> list[str]:
    return ["train", "--model", str(tmp_path / "model"), "--data", str(data), "--name", "r",
            "--output-dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("folder, message", [("empty", "contains no supported images"),
                                             ("missing", "does not exist or is not a folder")])
def test_bad_data_folder_is_reported_before_the_model_loads(tmp_path, caplog, no_model_load, folder, message):
    (tmp_path / "empty").mkdir()
    caplog.set_level(logging.ERROR)
    assert cli.main(_train(tmp_path, tmp_path / folder)) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_ambiguous_captions_are_reported_before_the_model_loads(tiny_training, caplog, no_model_load):
    (tiny_training.data / "img0.jpg").write_bytes((tiny_training.data / "img0.png").read_bytes())
    caplog.set_level(logging.ERROR)
    assert cli.main(_train(tiny_training.root, tiny_training.data)) == 2
    assert "share the name 'img0'" in caplog.text and not (tiny_training.root / "out").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.batch_size=1.5", r"data.batch_size=1.5 must be a whole number (int), not float 1.5; e.g. data.batch_size=1"),
    ("optim.betas=0.9", r"optim.betas=0.9 must be a list of numbers (tuple[float, ...]), e.g. optim.betas=[0.9, 0.999]"),
    ("lora.rank=8.5", r"lora.rank=8.5 must be a whole number (int)"),
    ("optim.lr=fast", r"optim.lr='fast' must be a number (float), not str 'fast'; e.g. optim.lr=0.0001"),
    ("ema.enabled=1", r"ema.enabled=1 must be true or false (bool)"),
    ("lr=1e-4", "'lr' is an unknown field (did you mean optim.lr?)"),
    ("optim.learning_rate=1e-4", "(did you mean optim.lr?)"),
    ("trian.steps=3", "'trian' is not a config section (did you mean train.steps"),
])
def test_bad_config_values_fail_before_anything_else(tiny_training, caplog, no_model_load, setting, message):
    caplog.set_level(logging.ERROR)
    assert cli.main(_train(tiny_training.root, tiny_training.data, "--set", setting)) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tiny_training.root / "out").exists()


@pytest.mark.parametrize("name", ["a/b", "a\x00b", "tab\there", ".."])
def test_bad_names_get_one_message_naming_the_flag(tmp_path, caplog, no_model_load, name):
    caplog.set_level(logging.ERROR)
    argv = _train(tmp_path, tmp_path)
    argv[argv.index("--name") + 1] = name
    assert cli.main(argv) == 2
    assert "--name: train.output_name=" in caplog.text and "must be a plain name without path separators" in caplog.text


def test_text_fields_take_the_text_as_typed():
    tree = cli.apply_overrides(TrainingConfig().to_dict(), ["train.output_name=123", "optim.lr=2e-4"])
    assert tree["train"]["output_name"] == "123" and tree["optim"]["lr"] == 2e-4


def test_type_errors_at_construction_name_field_type_and_example():
    with pytest.raises(ConfigError, match=r"^data.buckets.resolutions=512 must be a list of whole numbers"):
        TrainingConfig.from_dict({"data": {"buckets": {"resolutions": 512}}})
    with pytest.raises(ConfigError, match=r"^preview.prompts='a cat' must be a list of texts"):
        TrainingConfig.from_dict({"preview": {"prompts": "a cat"}})
    with pytest.raises(ConfigError, match=r"^train.output_name=5 must be text \(str\)"):
        TrainingConfig.from_dict({"train": {"output_name": 5}})
    with pytest.raises(ConfigError, match=r"^optim must be a section"):
        TrainingConfig.from_dict({"optim": 5})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['lr'\] in config \(did you mean optim.lr\?\)"):
        TrainingConfig.from_dict({"lr": 1e-4})


def test_a_dataset_that_fails_its_checks_leaves_no_run_folder(tiny_training):
    for p in tiny_training.data.iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="contains no supported images"):
        tiny_training.train(tiny_training.config())
    assert not (tiny_training.out / "run").exists()
