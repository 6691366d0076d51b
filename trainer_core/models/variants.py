"""Which model a module is: FLUX.1-dev, FLUX.1-schnell, FLUX.2-dev, Klein 4B, Klein 9B, Chroma.

The variant is what LoRA metadata, the model card and the logs report. It is read from the
weights alone (no file name), as four numbers and a flag (``ModelShape``):

* ``hidden``: width, ``img_in`` out-features (diffusers: ``x_embedder``);
* ``double`` / ``single``: block counts (diffusers: ``transformer_blocks`` /
  ``single_transformer_blocks``);
* ``context``: text width, ``txt_in`` in-features (diffusers: ``context_embedder``);
* ``guidance``: a guidance embedder with weights (``guidance_in``; ComfyUI puts an
  ``nn.Identity`` there when the model has none).

The family (a ``models.families`` record: FLUX.1, FLUX.2, ...) comes from the model adapter
(ComfyUI tells them apart by its model class). The rule (``detect_variant``), with the real shapes
(hidden / double+single / context / guidance):

=============== ======= ========= ======= ======== =============== =================
variant          hidden  blocks    context guidance single/double   context/hidden
=============== ======= ========= ======= ======== =============== =================
FLUX.1-dev       3072    19 + 38   4096    yes      2               4/3
FLUX.1-schnell   3072    19 + 38   4096    no       2               4/3
FLUX.2-dev       6144    8 + 48    15360   yes      6               5/2
Klein 9B         4096    8 + 24    12288   no       3               3
Klein 4B         3072    5 + 20    7680    no       4               5/2
Chroma           3072    19 + 38   4096    no       2               4/3
=============== ======= ========= ======= ======== =============== =================

1. A shape equal to a row (all four numbers and the flag) is that variant (``how="exact"``).
2. Else a shape of the row's family with the row's guidance flag and the same two ratios
   (single/double blocks, context/hidden width) is that variant (``how="ratios"``): a
   scaled-down test model, or a pruned / distilled cousin, keeps its proportions.
3. Else the family's fallback variant (``Family.fallback_variant``, "unknown size", ``how="family"``).
   (A FLUX.1-layout model of another size is most likely a fine-tune or a cousin such as
   a pruned Flex; we do not guess dev or schnell for it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from torch import nn

from .families import FAMILIES


@dataclass(frozen=True)
class ModelShape:
    family: str  # a models.families name
    hidden: int
    double: int
    single: int
    context: int
    guidance: bool

    def ratios(self) -> tuple[Optional[Fraction], Optional[Fraction]]:
        depth = Fraction(self.single, self.double) if self.double else None
        width = Fraction(self.context, self.hidden) if self.hidden else None
        return depth, width


@dataclass(frozen=True)
class Variant:
    """One model variant and the names other tools use for it (see ``lora.metadata``)."""

    name: str  # our key
    label: str  # for people: model card, logs
    family: str
    base_model_version: str  # ss_base_model_version (sd-scripts: "flux1"; musubi: architecture name)
    architecture: str  # modelspec.architecture
    shape: Optional[ModelShape] = None  # the real shape; None for the family fallbacks and edit names
    resolution: int = 1024  # native training resolution (documentation only)
    sai_model_spec: Optional[str] = None  # modelspec.sai_model_spec when it differs from the family's


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("flux1-dev", "FLUX.1-dev", "flux1", "flux1", "flux-1-dev/lora",
            ModelShape("flux1", 3072, 19, 38, 4096, True)),
    Variant("flux1-schnell", "FLUX.1-schnell", "flux1", "flux1", "flux-1-schnell/lora",
            ModelShape("flux1", 3072, 19, 38, 4096, False)),
    Variant("flux2-dev", "FLUX.2-dev", "flux2", "flux_2_dev", "Flux.2-dev/lora",
            ModelShape("flux2", 6144, 8, 48, 15360, True)),
    Variant("klein-9b", "FLUX.2 Klein 9B", "flux2", "flux_2_klein_9b", "Flux.2-klein-9b/lora",
            ModelShape("flux2", 4096, 8, 24, 12288, False)),
    Variant("klein-4b", "FLUX.2 Klein 4B", "flux2", "flux_2_klein_4b", "Flux.2-klein-4b/lora",
            ModelShape("flux2", 3072, 5, 20, 7680, False)),
    Variant("chroma", "Chroma", "chroma", "chroma", "chroma/lora",
            ModelShape("chroma", 3072, 19, 38, 4096, False)),
    Variant("flux1", "FLUX.1 (unknown size)", "flux1", "flux1", "flux-1-dev/lora"),
    # an edit LoRA (data.control_images) of a FLUX.1 model (``Family.edit_variant``): musubi-tuner's
    # FLUX.1 Kontext names; Kontext has FLUX.1-dev's shape, so it is never detected from the weights
    Variant("flux1-kontext", "FLUX.1 Kontext", "flux1", "flux_kontext", "Flux.1-dev/lora", sai_model_spec="1.0.0"),
    Variant("flux2", "FLUX.2 (unknown size)", "flux2", "flux2", "Flux.2/lora"),
    # Z-Image (``NextDiTZImage.model_shape``): "double" counts the main layers, "context" is the Qwen3-4B width
    Variant("z-image", "Z-Image", "zimage", "z_image", "Z-Image/lora", ModelShape("zimage", 3840, 30, 0, 2560, False)),
    Variant("zimage", "Z-Image (unknown size)", "zimage", "z_image", "Z-Image/lora"),
)}


@dataclass(frozen=True)
class Detection:
    variant: Variant
    shape: ModelShape
    how: str  # "exact" | "ratios" | "family"

    def describe(self) -> str:
        s = self.shape
        return (f"{self.variant.label} ({self.how}: hidden {s.hidden}, blocks {s.double}+{s.single}, "
                f"text width {s.context}, guidance {'yes' if s.guidance else 'no'})")


def detect_variant(shape: ModelShape) -> Detection:
    """The variant of ``shape`` by the rule in the module docstring."""
    fallback = FAMILIES.get(shape.family).fallback_variant  # an unknown family raises, naming the known ones
    known = [v for v in VARIANTS.values() if v.shape is not None and v.family == shape.family]
    for v in known:
        if v.shape == shape:
            return Detection(v, shape, "exact")
    for v in known:
        if v.shape.guidance == shape.guidance and v.shape.ratios() == shape.ratios():
            return Detection(v, shape, "ratios")
    return Detection(VARIANTS[fallback], shape, "family")


def _first(module: nn.Module, *names: str) -> Any:
    for name in names:
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def module_shape(module: nn.Module, family: str) -> ModelShape:
    """``ModelShape`` of a ComfyUI/BFL FLUX module or a diffusers FLUX transformer."""
    img_in = _first(module, "img_in", "x_embedder")
    txt_in = _first(module, "txt_in", "context_embedder")
    double = _first(module, "double_blocks", "transformer_blocks")
    single = _first(module, "single_blocks", "single_transformer_blocks")
    if img_in is None or txt_in is None or double is None or single is None:
        raise ValueError(f"cannot read the shape of {type(module).__name__}: it has no img_in/txt_in/"
                         "double_blocks/single_blocks (or their diffusers names)")
    guidance_in = _first(module, "guidance_in", "time_text_embed.guidance_embedder", "time_guidance_embed.guidance_embedder")
    guidance = guidance_in is not None and any(True for _ in guidance_in.parameters())
    return ModelShape(family=family, hidden=int(img_in.weight.shape[0]), double=len(double), single=len(single),
                      context=int(txt_in.weight.shape[1]), guidance=bool(guidance))


def model_variant(model: Any) -> Detection:
    """The ``Detection`` of a ``FlowModel`` (its ``arch`` is the family): the adapter's own
    ``model_shape()`` when it has one (a non-FLUX layout), else ``module_shape``."""
    own = getattr(model, "model_shape", None)
    return detect_variant(own() if own is not None else module_shape(model.module, model.arch))
