"""Model variant detection (models/variants.py): the rule on the real shapes, on tiny
modules with the real depth/width ratios, the family fallbacks, and both module layouts."""
from __future__ import annotations

import pytest
from torch import nn

from trainer_core.models.variants import VARIANTS, ModelShape, detect_variant, module_shape

# The real shapes (SCALE-FAMILIES-FACTS §4; ComfyUI's model_detection): written out here
# independently of the table in variants.py, so a typo there fails.
REAL = {
    "flux1-dev": ("flux1", 3072, 19, 38, 4096, True),
    "flux1-schnell": ("flux1", 3072, 19, 38, 4096, False),
    "flux2-dev": ("flux2", 6144, 8, 48, 15360, True),
    "klein-9b": ("flux2", 4096, 8, 24, 12288, False),
    "klein-4b": ("flux2", 3072, 5, 20, 7680, False),
}
# Tiny stand-ins: widths / 128, block counts with the real single/double ratio.
TINY = {
    "flux1-dev": ("flux1", 24, 1, 2, 32, True),
    "flux1-schnell": ("flux1", 24, 2, 4, 32, False),
    "flux2-dev": ("flux2", 48, 1, 6, 120, True),
    "klein-9b": ("flux2", 32, 2, 6, 96, False),
    "klein-4b": ("flux2", 24, 1, 4, 60, False),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_are_detected_exactly(name):
    found = detect_variant(ModelShape(*REAL[name]))
    assert (found.variant.name, found.how) == (name, "exact")


class StandIn(nn.Module):
    """The parts of ComfyUI's FLUX module the rule reads: img_in, txt_in, block lists and
    guidance_in (an nn.Identity when the model has no guidance embedding, as in ComfyUI)."""

    def __init__(self, hidden, double, single, context, guidance):
        super().__init__()
        self.img_in = nn.Linear(16, hidden)
        self.txt_in = nn.Linear(context, hidden)
        self.double_blocks = nn.ModuleList(nn.Identity() for _ in range(double))
        self.single_blocks = nn.ModuleList(nn.Identity() for _ in range(single))
        self.guidance_in = nn.Linear(8, hidden) if guidance else nn.Identity()


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_modules_with_the_real_ratios_are_detected_by_ratio(name):
    family, *dims = TINY[name]
    shape = module_shape(StandIn(*dims), family)
    assert shape == ModelShape(*TINY[name])
    found = detect_variant(shape)
    assert (found.variant.name, found.how) == (name, "ratios")


@pytest.mark.parametrize("shape, expected", [
    (("flux1", 24, 1, 1, 32, True), "flux1"),  # depth ratio 1: no known FLUX.1
    (("flux2", 48, 1, 6, 120, False), "flux2"),  # dev's proportions without its guidance embedding
    (("flux2", 24, 1, 4, 48, False), "flux2"),  # Klein 4B depth, wrong text width
    (("flux2", 4096, 8, 24, 12288, True), "flux2"),  # Klein 9B shape with a guidance embedding
])
def test_other_shapes_fall_back_to_the_family(shape, expected):
    found = detect_variant(ModelShape(*shape))
    assert (found.variant.name, found.how) == (expected, "family")
    assert found.variant.shape is None and "unknown size" in found.variant.label


def test_diffusers_layout_is_read_too():
    from tiny_run import tiny_model

    shape = module_shape(tiny_model().module, "flux1")
    assert shape == ModelShape("flux1", 32, 1, 1, 64, False)


def test_unknown_family_and_unreadable_module_are_errors():
    with pytest.raises(ValueError, match="family"):
        detect_variant(ModelShape("sdxl", 1, 1, 1, 1, False))
    with pytest.raises(ValueError, match="img_in"):
        module_shape(nn.Linear(2, 2), "flux1")


def test_every_variant_has_distinct_names_for_other_tools():
    known = [v for v in VARIANTS.values() if v.shape is not None]
    assert len({v.architecture for v in known}) == len(known)
    assert len({(v.shape.guidance, v.shape.ratios()) for v in known if v.family == "flux2"}) == 3
