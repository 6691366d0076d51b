"""Per-variant training defaults (``PRESETS``) and how to apply them to a config.

``model.preset`` chooses one (``auto`` = the variant detected from the weights,
``models.variants``; ``none``; or a variant name) and ``with_preset`` applies it. "Explicit"
means *differs from the default*: a preset fills only the fields still at their default
value (``explicit_fields``), so anything the user changed wins. To force a default value
against a preset, choose the preset ``none``.

Sources: FLUX.2 (dev, Klein 9B, Klein 4B) from the origin FLUX.2 LoRA guide (rank 16 for
most uses, 32 on dev; lr 1e-4 for every model; ``attention`` targets, ``all`` costs memory
and dev should avoid it; σ scheme ``balanced`` with ``bell_shaped`` weighting; DOP every
1-2 steps on Klein 4B, 4 on Klein 9B, 8 on dev). FLUX.1 (dev, schnell) from kohya's
FLUX.1 documentation (dim 16, lr 1e-4, guidance 1.0, ``shift`` 3.1582, no extra
weighting) with the LoRA on every linear layer of the blocks, as kohya and ai-toolkit do.
Chroma from kohya's FLUX.1 documentation for Chroma (the same network on every block linear;
``sigmoid`` timestep sampling; not guidance-distilled, the adapter feeds guidance 0).
Training guidance is 1.0 everywhere: the guidance-distilled models (FLUX.1-dev, FLUX.2-dev)
train at 1.0 (ai-toolkit, kohya); the others ignore it. Z-Image from musubi-tuner's Z-Image
documentation (σ shift 2.0 for training, LoRA on every linear of the main layers, which is our
``all``; rank 16 and lr 1e-4 as for the others). The ``flux1`` / ``flux2`` / ``zimage``
fallbacks (unknown size) have no preset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from .config import TrainingConfig


@dataclass(frozen=True)
class Preset:
    rank: int
    lr: float
    targets: str  # lora.targets
    sigma_scheme: str  # flow.sigma_scheme
    weighting: str  # flow.weighting
    guidance: float  # flow.guidance
    dop_every_n_steps: int  # dop.every_n_steps (used when DOP is on)
    shift: float = 3.0  # flow.shift (the "shift" scheme)

    def fields(self) -> dict[str, Any]:
        """Dotted config field → value."""
        p = asdict(self)
        return {"lora.rank": p["rank"], "optim.lr": p["lr"],
                "lora.targets": p["targets"], "flow.sigma_scheme": p["sigma_scheme"], "flow.weighting": p["weighting"],
                "flow.guidance": p["guidance"], "flow.shift": p["shift"], "dop.every_n_steps": p["dop_every_n_steps"]}


_FLUX1 = Preset(rank=16, lr=1e-4, targets="all", sigma_scheme="shift", weighting="none", guidance=1.0,
                dop_every_n_steps=1, shift=3.1582)
_FLUX2 = dict(lr=1e-4, targets="attention", sigma_scheme="balanced", weighting="bell_shaped", guidance=1.0)

PRESETS: dict[str, Preset] = {
    "flux1-dev": _FLUX1,
    "flux1-schnell": _FLUX1,
    "flux2-dev": Preset(rank=32, dop_every_n_steps=8, **_FLUX2),
    "klein-9b": Preset(rank=16, dop_every_n_steps=4, **_FLUX2),
    "klein-4b": Preset(rank=16, dop_every_n_steps=1, **_FLUX2),
    "chroma": Preset(rank=16, lr=1e-4, targets="all", sigma_scheme="sigmoid", weighting="none", guidance=1.0,
                     dop_every_n_steps=1),
    "z-image": Preset(rank=16, lr=1e-4, targets="all", sigma_scheme="shift", weighting="none", guidance=1.0,
                      dop_every_n_steps=1, shift=2.0),
}
"""Variant name (``models.variants.VARIANTS``) → its defaults."""


def apply_preset(config: TrainingConfig, preset: Preset, explicit: Iterable[str] = ()) -> TrainingConfig:
    """``config`` with the preset's fields, except the dotted fields in ``explicit`` (the user's).
    ``lora.alpha`` follows the resulting rank (alpha = rank) unless it is explicit."""
    keep = set(explicit)
    tree = config.to_dict()
    for dotted, value in preset.fields().items():
        if dotted in keep:
            continue
        section, name = dotted.split(".")
        tree[section][name] = value
    if "lora.alpha" not in keep:
        tree["lora"]["alpha"] = float(tree["lora"]["rank"])
    return TrainingConfig.from_dict(tree)


def preset_for(choice: str, variant: Optional[str]) -> Optional[str]:
    """The preset name ``model.preset = choice`` means for a model of ``variant`` (a
    ``VARIANTS`` name or None when undetected): None for ``none`` and for ``auto`` on a model
    without a preset (an unknown size)."""
    if choice == "none":
        return None
    if choice == "auto":
        return variant if variant in PRESETS else None
    if choice not in PRESETS:
        raise ValueError(f"model.preset={choice!r} is not a preset; use auto, none or one of {', '.join(PRESETS)}")
    return choice


def explicit_fields(config: TrainingConfig, base: TrainingConfig) -> set[str]:
    """The preset's fields (and ``lora.alpha``) whose value in ``config`` differs from ``base``
    (the config as built from untouched defaults): those the user set."""
    names = [*next(iter(PRESETS.values())).fields(), "lora.alpha"]

    def get(cfg: TrainingConfig, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(cfg, section), name)

    return {n for n in names if get(config, n) != get(base, n)}


def with_preset(config: TrainingConfig, variant: Optional[str], base: Optional[TrainingConfig] = None
                ) -> tuple[TrainingConfig, Optional[str], set[str]]:
    """``(config, preset name or None, the user's fields kept)``: the preset ``config.model.preset``
    chooses for ``variant``, applied to the fields that still equal ``base`` (default: the
    engine's defaults). The returned config records the preset it applied in ``model.preset``
    ("none" when none), and ``variant`` in ``model.variant``, so its ``config.json`` runs again as it is."""
    base = base if base is not None else TrainingConfig()
    name = preset_for(config.model.preset, variant)
    kept = explicit_fields(config, base) if name else set()
    out = apply_preset(config, PRESETS[name], kept) if name else config
    model = dataclasses.replace(out.model, preset=name or "none", variant=variant or out.model.variant)
    return out.replace(model=model), name, kept


def _short(x: float) -> str:
    """1e-4 rather than 0.0001."""
    text = f"{x:.2e}"
    mantissa, exponent = text.split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}" if abs(int(exponent)) > 2 else f"{x:g}"


def describe(config: TrainingConfig, name: Optional[str], kept: Iterable[str] = (), label: str = "") -> str:
    """One line for the node and the log: "preset: FLUX.2 Klein 9B — rank 16, lr 1e-4, ..."."""
    if name is None:
        return f"preset: none{f' ({label})' if label else ''}"
    c = config
    parts = [f"rank {c.lora.rank}", f"lr {_short(c.optim.lr)}", f"targets {c.lora.targets}",
             f"σ {c.flow.sigma_scheme}" + (f" {c.flow.shift:g}" if c.flow.sigma_scheme == "shift" else ""),
             f"weighting {c.flow.weighting}", f"guidance {c.flow.guidance:g}", f"DOP every {c.dop.every_n_steps}"]
    yours = sorted(kept)
    return f"preset: {label or name} — {', '.join(parts)}" + (f" (yours: {', '.join(yours)})" if yours else "")
