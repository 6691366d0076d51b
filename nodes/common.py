"""What several FlowTrain nodes share: the custom socket types, tooltips read from the
engine's config help, and ComfyUI progress reporting for a training run."""
from __future__ import annotations

import logging
import math
from typing import Optional

from comfy_api.latest import io

from trainer_core.config import field_help

log = logging.getLogger(__name__)

CATEGORY = "FlowTrain"
Dataset = io.Custom("FLOWTRAIN_DATASET")
LoraConfigType = io.Custom("FLOWTRAIN_LORA_CONFIG")
DopType = io.Custom("FLOWTRAIN_DOP")
PreviewType = io.Custom("FLOWTRAIN_PREVIEW")
PROGRESS_EVENT = "flowtrain.progress"
PHASE_EVENT = "flowtrain.phase"


def tip(config_cls: type, name: str, extra: str = "") -> str:
    """The tooltip of a widget that sets ``config_cls.name``: the config's help text."""
    text = field_help(config_cls, name)
    return f"{text} {extra}".strip()


def bounds(config_cls: type, name: str) -> dict:
    """``min``/``max`` of a numeric widget from the config field's range (open lower
    bounds are left to the config's own validation, which names the field)."""
    import dataclasses

    meta = next(f.metadata for f in dataclasses.fields(config_cls) if f.name == name)
    out = {}
    if meta.get("lo") is not None:
        out["min"] = meta["lo"]
    if meta.get("hi") is not None:
        out["max"] = meta["hi"]
    return out


def send_text(text: str, node_id: Optional[str]) -> None:
    """Text shown on the node while it runs (no-op without a server, e.g. in scripts)."""
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


def send_event(event: str, data: dict) -> None:
    """A ``flowtrain.*`` event for the web extension (no-op without a server)."""
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, server.client_id)


class TrainingProgress:
    """The engine's ``progress(step, total, logs)`` hook for one node: ComfyUI's progress
    bar, the loss as node text and a ``flowtrain.progress`` event for the web chart.
    ``phase`` is its ``phase_progress(phase, n, total, info)`` hook (``trainer_core.phases``):
    the bar and node text count the images and captions encoded before step 1 (n/N, rate,
    ETA), and a ``flowtrain.phase`` event tells the chart what the run is doing. Both keep
    ``live`` (``control_routes.LiveRun``, what the node's buttons and a reloaded page read)
    current and carry the run's control ``state`` (running, paused, saving, stopping...).

    The bar is left alone once Cancel was pressed: ComfyUI's progress hook would raise the
    interrupt inside the engine's callback; instead the engine sees ``should_stop`` after
    the step, saves, and returns ``"stopped"``."""

    def __init__(self, node_id: Optional[str], total: int, live=None):
        import comfy.utils

        self.node_id, self.total, self.live = node_id, total, live
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def phase(self, phase: str, n: int, total: int, info: dict) -> None:
        import comfy.model_management
        from trainer_core.phases import describe

        if total and not comfy.model_management.processing_interrupted():
            self.bar.update_absolute(n, total)
        if total:
            send_text(f"{phase} {n}/{total}{describe(info)}", self.node_id)
        elif phase in ("loading", "previews", "saving", "paused", "stopping"):
            send_text(f"{phase}…", self.node_id)
        rate, eta = info.get("rate"), info.get("eta")
        if self.live is not None:
            self.live.phase = phase
        send_event(PHASE_EVENT, {"node": self.node_id, "phase": phase, "n": n, "total": total,
                                 "rate": rate, "eta": eta, "state": self.state})

    @property
    def state(self) -> Optional[str]:
        return self.live.state if self.live is not None else None

    def __call__(self, step: int, total: int, logs: dict) -> None:
        import comfy.model_management

        loss, lr = float(logs.get("loss", math.nan)), float(logs.get("lr", math.nan))
        if not comfy.model_management.processing_interrupted():
            self.bar.update_absolute(step, total)
        from trainer_core.phases import step_timing

        s_per_it, eta = logs.get("s_per_it"), logs.get("eta")
        timing = step_timing(s_per_it, eta)
        send_text(f"step {step}/{total}  loss {loss:.4f}" + (f"  ({timing})" if timing else ""), self.node_id)
        if self.live is not None:
            self.live.on_step(step, total, logs)
        send_event(PROGRESS_EVENT, {"node": self.node_id, "step": step, "total": total,
                                    "loss": loss if math.isfinite(loss) else None,
                                    "lr": lr if math.isfinite(lr) else None,
                                    "s_per_it": s_per_it, "eta": eta, "state": self.state})
