"""The model-family registry: every record is complete and consistent with the other registries."""
import re

import pytest

from trainer_core.config import BucketConfig, ConfigError, TrainingConfig
from trainer_core.lora.formats import LORA_FORMATS
from trainer_core.lora.io import build_metadata
from trainer_core.models.families import FAMILIES, all_families, common_pixel_multiple, family
from trainer_core.models.variants import VARIANTS, ModelShape, detect_variant

NAMES = FAMILIES.names()


@pytest.mark.parametrize("name", NAMES)
def test_record_is_complete(name):
    fam = family(name)
    assert fam.name == name
    LORA_FORMATS.get(fam.lora_format)  # a registered file format
    assert callable(fam.adapter_class())
    assert fam.pixel_multiple % common_pixel_multiple() == 0
    for preset in ("attention", "all"):
        re.compile(fam.target_presets[preset])
    variants = fam.variants()
    assert VARIANTS[fam.fallback_variant] in variants
    assert all(v.family == name for v in variants)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_names_come_from_the_record(name):
    fam = family(name)
    md = build_metadata(TrainingConfig(), arch=name, steps=1, trigger_word="", base_model="m")
    assert md["flowtrain.arch"] == name
    assert md["ss_network_module"] == fam.network_module
    assert md["ss_model_type"] == fam.kohya_model_type
    assert md["modelspec.implementation"] == fam.implementation
    assert md["modelspec.sai_model_spec"] == fam.sai_model_spec
    assert md["ss_base_model_version"] == VARIANTS[fam.fallback_variant].base_model_version


def test_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'sdxl'.*flux1.*flux2"):
        family("sdxl")
    with pytest.raises(ValueError, match="unknown model family"):
        build_metadata(TrainingConfig(), arch="sdxl", steps=1, trigger_word="", base_model="m")
    with pytest.raises(ValueError, match="unknown model family"):
        detect_variant(ModelShape("sdxl", 128, 1, 2, 64, False))


def test_config_pixel_rule_is_the_families_common_multiple():
    m = common_pixel_multiple()
    assert all(f.pixel_multiple % m == 0 for f in all_families())
    BucketConfig(step=m)
    with pytest.raises(ConfigError, match=f"multiple of {m}"):
        BucketConfig(step=m + 8)


@pytest.mark.parametrize("name", NAMES)
def test_edit_variant_is_a_variant_of_the_family(name):
    fam = family(name)
    if fam.edit_variant is not None:
        assert fam.references, f"{name}: an edit_variant needs a family that takes reference images"
        assert VARIANTS[fam.edit_variant] in fam.variants()
