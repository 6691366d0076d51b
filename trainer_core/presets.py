"""Per-variant training defaults (``PRESETS``) and how to apply them to a config.

Nothing applies them automatically yet: a later ``preset`` widget (``auto`` = the detected
variant, ``models.variants``) calls ``apply_preset`` with the fields the user set
explicitly, which always win.

Sources: FLUX.2 (dev, Klein 9B, Klein 4B) from the origin FLUX.2 LoRA guide (rank 16 for
most uses, 32 on dev; lr 1e-4 for every model; ``attention`` targets, ``all`` costs memory
and dev should avoid it; σ scheme ``balanced`` with ``bell_shaped`` weighting; DOP every
1-2 steps on Klein 4B, 4 on Klein 9B, 8 on dev). FLUX.1 (dev, schnell) from kohya's
FLUX.1 documentation (dim 16, lr 1e-4, guidance 1.0, ``shift`` 3.1582, no extra
weighting) with the LoRA on every linear layer of the blocks, as kohya and ai-toolkit do.
Chroma from kohya's FLUX.1 documentation for Chroma (the same network on every block linear;
``sigmoid`` timestep sampling; not guidance-distilled, the adapter feeds guidance 0).
Training guidance is 1.0 everywhere: the guidance-distilled models (FLUX.1-dev, FLUX.2-dev)
train at 1.0 (ai-toolkit, kohya); the others ignore it. The ``flux1`` / ``flux2`` fallbacks
(unknown size) have no preset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

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
