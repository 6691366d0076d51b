"""The config tree: validation messages name the field and the allowed values."""
import dataclasses
import json

import pytest

from trainer_core.config import (
    BucketConfig, CaptionConfig, ConfigError, DataConfig, DopConfig, FlowConfig, LoRAConfig, OptimConfig,
    TrainConfig, TrainingConfig, field_help,
)


def test_defaults_are_valid_and_round_trip_through_json():
    c = TrainingConfig()
    again = TrainingConfig.from_dict(json.loads(c.to_json()))
    assert again == c


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainingConfig().lora.rank = 4  # type: ignore[misc]


@pytest.mark.parametrize("make, message", [
    (lambda: LoRAConfig(rank=0), r"lora.rank=0 is out of range; allowed \[1, 1024\]"),
    (lambda: LoRAConfig(alpha=0), r"lora.alpha=0 is out of range; allowed \(0"),
    (lambda: LoRAConfig(targets="custom"), r"lora.target_regex is empty"),
    (lambda: LoRAConfig(targets="custom", target_regex="(["), r"not a valid regex"),
    (lambda: FlowConfig(sigma_scheme="karras"), r"flow.sigma_scheme='karras' is not a known choice; use one of: uniform"),
    (lambda: OptimConfig(optimizer="sgdx"), r"optim.optimizer='sgdx' is not a known choice"),
    (lambda: OptimConfig(lr=-1), r"optim.lr=-1"),
    (lambda: OptimConfig(betas=(0.9,)), r"optim.betas"),
    (lambda: BucketConfig(step=24), r"buckets.step=24 must be a multiple of 16"),
    (lambda: BucketConfig(resolutions=()), r"buckets.resolutions must list at least one value"),
    (lambda: BucketConfig(resolutions=(512, 10)), r"buckets.resolutions=\(512, 10\) is out of range"),
    (lambda: BucketConfig(min_side=1024, max_side=512), r"min_side=1024 is larger"),
    (lambda: CaptionConfig(caption_dropout=1.5), r"captions.caption_dropout=1.5 is out of range"),
    (lambda: TrainConfig(output_name="../escape"), r"train.output_name='../escape' must be a plain name"),
    (lambda: TrainConfig(output_name="a/b"), r"must be a plain name"),
    (lambda: TrainConfig(steps=True), r"train.steps=True must be a whole number \(int\)"),
    (lambda: TrainingConfig(dop=DopConfig(enabled=True)), r"dop.enabled needs data.captions.trigger_word"),
])
def test_bad_values_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unknown_keys_fail_instead_of_being_ignored():
    d = TrainingConfig().to_dict()
    d["optim"]["learning_rate"] = 1e-3  # a typo for "lr"
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['learning_rate'\] in optim"):
        TrainingConfig.from_dict(d)


def test_nested_sections_build_from_dicts():
    c = TrainingConfig.from_dict({"data": {"buckets": {"resolutions": [512, 768]}}, "lora": {"rank": 4}})
    assert c.data.buckets.resolutions == (512, 768) and c.lora.rank == 4
    assert isinstance(c.data, DataConfig)


def test_every_field_has_help_text():
    def walk(cls):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                yield from walk(type(default))
            else:
                yield cls, f.name
    for cls, name in walk(TrainingConfig):
        assert len(field_help(cls, name)) > 10, f"{cls.__name__}.{name} needs help text"
