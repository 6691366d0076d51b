"""Model families: one frozen record per family says everything the engine needs to know.

A family is a transformer layout that one adapter class calls the same way (FLUX.1 dev and
schnell, FLUX.2 dev and Klein, Chroma, ...). Its sizes are variants (``models.variants``,
whose ``Variant.family`` names a record here). The family name is also the ``arch`` string
a ``FlowModel`` carries, the ``flowtrain.arch`` metadata key and the key of the bridge's
table of ComfyUI model classes (``nodes/bridge/model.py`` ``FAMILY_OF_MODEL``).

Adding a family = one adapter module (or an existing adapter), one record here, one bridge
table entry; see docs/adding-a-model.md. Code that differs by family reads a record field
instead of comparing ``arch`` strings.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..lora.bfl_names import bfl_target_presets
from ..registry import Registry

GUIDANCE_INPUTS = ("embedder", "zero")
"""How a family's module takes guidance: ``embedder`` = the distilled guidance value, only
when the module has a guidance embedder (FLUX.1-dev, FLUX.2-dev; schnell and Klein have none);
``zero`` = always a guidance tensor of 0, which is what ComfyUI's sampler passes by default
(Chroma: its modulation network takes a guidance slot it was not distilled on)."""


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). All sizes are per the released models.

    ``latent_channels`` / ``vae_factor`` / ``patch_size``: the model-space latent the adapter
    takes ([B, C, H/vae_factor, W/vae_factor]) and how many latent pixels make one token per side.
    ``context_tokens``: the text context is left-padded with zeros to this many tokens before the
    call, as ComfyUI's ``extra_conds`` does (FLUX.2: 512); None = passed as encoded.
    ``pooled``: the module takes a pooled text vector ``y`` (FLUX.1's CLIP-L); without it
    any pooled vector an encoder returns is dropped. ``guidance``: one of ``GUIDANCE_INPUTS``.
    ``lora_format``: key of ``lora.formats.LORA_FORMATS`` the files are written in.
    ``network_module`` / ``kohya_model_type``: ``ss_network_module`` / ``ss_model_type``.
    ``sai_model_spec`` / ``implementation``: ``modelspec.sai_model_spec`` / ``.implementation``
    (per variant names, ``ss_base_model_version`` and ``modelspec.architecture``, live on the
    ``Variant``). ``fallback_variant``: the variant reported when the size matches no released
    one. ``target_presets``: ``lora.targets`` name → regex (``re.fullmatch`` on the module's
    submodule names). ``adapter``: ``"module:Class"`` of the ``FlowModel`` adapter (imported on
    use, so this module stays light). ``memory_layout``: which block layout the memory estimator
    (``trainer_core.memory``) assumes. ``text_tokens``: a typical text length for estimates.
    ``references``: the module takes clean reference latents (edit models: FLUX.1 Kontext loads
    as FLUX.1, FLUX.2 dev/Klein edit natively), so ``data.control_images`` can train edit LoRAs
    (``models/references.py``). ``edit_variant``: the variant whose names (``ss_base_model_version``,
    ``modelspec.*``) an edit LoRA of this family carries (FLUX.1: Kontext, as musubi-tuner writes it);
    None = the detected variant's.
    """

    name: str
    label: str
    text_encoder: str  # for people: what conditions the model
    latent_channels: int
    vae_factor: int
    patch_size: int
    context_tokens: Optional[int]
    pooled: bool
    guidance: str
    lora_format: str
    network_module: str
    kohya_model_type: str
    sai_model_spec: str
    implementation: str
    fallback_variant: str
    adapter: str
    memory_layout: str
    text_tokens: int
    target_presets: Mapping[str, str] = field(default_factory=bfl_target_presets)
    references: bool = False
    edit_variant: Optional[str] = None

    def __post_init__(self):
        if self.guidance not in GUIDANCE_INPUTS:
            raise ValueError(f"family {self.name}: guidance={self.guidance!r}; expected one of {GUIDANCE_INPUTS}")
        for name in ("attention", "all"):
            if name not in self.target_presets:
                raise ValueError(f"family {self.name}: target_presets needs an {name!r} regex")

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor × patch)."""
        return self.vae_factor * self.patch_size

    def adapter_class(self) -> type:
        module, _, cls = self.adapter.partition(":")
        return getattr(importlib.import_module(module), cls)

    def variants(self) -> list:
        """This family's ``models.variants.Variant``s (released sizes and the fallback)."""
        from .variants import VARIANTS

        return [v for v in VARIANTS.values() if v.family == self.name]


FAMILIES: Registry[Family] = Registry("model family")

_BFL = "trainer_core.models.bfl_flux:BflFlux"  # == bfl_flux.ADAPTER

FAMILIES.add("flux1", Family(
    name="flux1", label="FLUX.1", text_encoder="CLIP-L (pooled) + T5-XXL",
    latent_channels=16, vae_factor=8, patch_size=2, context_tokens=None, pooled=True, guidance="embedder",
    lora_format="flux1_kohya", network_module="networks.lora_flux", kohya_model_type="flux",
    sai_model_spec="1.0.1", implementation="https://github.com/black-forest-labs/flux",
    fallback_variant="flux1", adapter=_BFL, memory_layout="flux1", text_tokens=256, references=True,
    edit_variant="flux1-kontext",
))
FAMILIES.add("flux2", Family(
    name="flux2", label="FLUX.2", text_encoder="Mistral 3 / Qwen3 (no pooled vector)",
    latent_channels=128, vae_factor=16, patch_size=1, context_tokens=512, pooled=False, guidance="embedder",
    # ss_network_module: no kohya value exists for FLUX.2; networks.lora_flux2 by analogy
    lora_format="flux2_diffusion_model", network_module="networks.lora_flux2", kohya_model_type="flux",
    sai_model_spec="1.0.0", implementation="https://github.com/black-forest-labs/flux2",
    fallback_variant="flux2", adapter=_BFL, memory_layout="flux2", text_tokens=512, references=True,
))

FAMILIES.add("chroma", Family(
    name="chroma", label="Chroma", text_encoder="T5-XXL only (no pooled vector, no padding)",
    # FLUX.1-schnell blocks without per-block modulation: a "distilled_guidance_layer" network makes
    # every block's shift/scale/gate from (σ, guidance slot, slot index); left out of the presets.
    latent_channels=16, vae_factor=8, patch_size=2, context_tokens=None, pooled=False, guidance="zero",
    lora_format="flux1_kohya", network_module="networks.lora_flux", kohya_model_type="chroma",
    sai_model_spec="1.0.1", implementation="https://huggingface.co/lodestones/Chroma",
    fallback_variant="chroma", adapter=_BFL, memory_layout="flux1", text_tokens=256,
))

# Z-Image: ComfyUI's Lumina2/NextDiT module at width 3840 (docs/adding-a-model.md; models/zimage.py).
# Targets like musubi: the main layers' fused qkv/out (+ SwiGLU MLP), no refiners, adaLN or embedders.
_NEXTDIT_ATTN = r"layers\.\d+\.attention\.(?:qkv|out)"
_NEXTDIT_MLP = r"layers\.\d+\.feed_forward\.(?:w1|w2|w3)"
FAMILIES.add("zimage", Family(
    name="zimage", label="Z-Image", text_encoder="Qwen3-4B (hidden states, no pooled vector)",
    latent_channels=16, vae_factor=8, patch_size=2, context_tokens=None, pooled=False, guidance="embedder",
    # musubi-tuner's names (no kohya trainer exists); ss_model_type by analogy with ss_base_model_version
    lora_format="zimage_diffusion_model", network_module="networks.lora_zimage", kohya_model_type="z_image",
    sai_model_spec="1.0.0", implementation="https://github.com/Tongyi-MAI/Z-Image",
    fallback_variant="zimage", adapter="trainer_core.models.zimage:NextDiTZImage",
    memory_layout="nextdit",  # not estimated yet: the adapter has no plan_memory (no streaming)
    text_tokens=512, target_presets={"attention": _NEXTDIT_ATTN, "all": f"(?:{_NEXTDIT_ATTN}|{_NEXTDIT_MLP})"},
))


def family(name: str) -> Family:
    """The record of ``name`` (a ValueError listing the registered families otherwise)."""
    return FAMILIES.get(name)


def all_families() -> list[Family]:
    return [FAMILIES.get(n) for n in FAMILIES.names()]


def supported_labels() -> str:
    """"FLUX.1, FLUX.2, ..." for messages that refuse a model."""
    return ", ".join(f.label for f in all_families())


def common_pixel_multiple() -> int:
    """The largest side multiple every family accepts (gcd of their ``pixel_multiple``):
    what a config can require before the model is known."""
    return math.gcd(*(f.pixel_multiple for f in all_families()))
