"""Exponential moving average (EMA) of the LoRA weights.

``shadow ← shadow - (1 - d_k)·(shadow - θ)`` after the k-th EMA update, with the warmup
decay of diffusers' ``EMAModel.get_decay`` (diffusers/training_utils.py, ``use_ema_warmup``
with ``update_after_step=0``, ``min_decay=0``)::

    s   = max(0, k - 1)
    d_k = 0                                            if s == 0
    d_k = min(decay, 1 - (1 + s / inv_gamma) ** -power)  otherwise

k counts EMA updates (diffusers counts calls of ``EMAModel.step``), so the first update
copies the weights and with ``update_every = N`` one update covers N optimizer steps
(an averaging horizon of about N / (1 - decay) steps).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from .config import EmaConfig
from .loop import Callback

log = logging.getLogger(__name__)

EMA_FORMAT = 1


def ema_decay(k: int, *, decay: float, power: float, inv_gamma: float) -> float:
    """The decay used at the k-th (1-based) EMA update; see the module docstring."""
    s = max(0, k - 1)
    if s == 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + s / inv_gamma) ** -power)


class LoraEMA:
    """EMA copies (float32) of every LoRA parameter, on the parameter's device or the CPU.

    ``network`` needs ``named_parameters()``, ``state_dict()`` and ``load_state_dict()``
    (``lora.network.LoraNetwork``). ``update(step)`` runs every ``cfg.update_every``
    optimizer steps; ``swapped_in()`` lends the averaged weights to the network.
    """

    def __init__(self, network: Any, cfg: EmaConfig):
        self.network, self.cfg = network, cfg
        self.updates = 0
        self.shadow = {n: self._stored(p) for n, p in network.named_parameters()}

    def _stored(self, p: torch.Tensor) -> torch.Tensor:
        t = p.detach().float().clone()
        return t.cpu() if self.cfg.on_cpu else t

    def decay(self, k: int) -> float:
        return ema_decay(k, decay=self.cfg.decay, power=self.cfg.power, inv_gamma=self.cfg.inv_gamma)

    @torch.no_grad()
    def update(self, step: int) -> float | None:
        """After optimizer step ``step`` (1-based): fold the current weights in when
        ``step % update_every == 0``. Returns the decay used, or None when skipped."""
        if step % self.cfg.update_every:
            return None
        self.updates += 1
        d = self.decay(self.updates)
        for n, p in self.network.named_parameters():
            s = self.shadow[n]
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
        return d

    def state_dict(self) -> dict[str, Any]:
        """``{"format_version", "updates": int, "tensors": {name: fp32 CPU tensor}}``."""
        return {"format_version": EMA_FORMAT, "updates": self.updates,
                "tensors": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        missing, extra = sorted(set(self.shadow) - set(tensors)), sorted(set(tensors) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state does not match the LoRA network: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(self.shadow[n].shape):
                raise ValueError(f"EMA state {n!r} has shape {tuple(t.shape)}, expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Put the EMA weights into the network; restore the raw ones on exit (also on error)."""
        raw = self.network.state_dict()
        self.network.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.network.load_state_dict(raw)


class EmaCallback(Callback):
    """Creates the EMA at the start (unless ``state.extra["ema"]`` already holds one, e.g.
    restored by a resume), stores it in ``state.extra["ema"]`` and updates it after every
    optimizer step; the decay used goes to ``logs["ema_decay"]``."""

    def __init__(self, cfg: EmaConfig):
        self.cfg = cfg

    def on_train_start(self, state) -> None:
        if "ema" not in state.extra:
            state.extra["ema"] = LoraEMA(state.network, self.cfg)
            log.info("EMA of the LoRA weights: decay %g, power %g, inv_gamma %g, every %d step(s)%s",
                     self.cfg.decay, self.cfg.power, self.cfg.inv_gamma, self.cfg.update_every,
                     " (on CPU)" if self.cfg.on_cpu else "")

    def on_step_end(self, state, logs: dict) -> None:
        d = state.extra["ema"].update(state.step)
        if d is not None:
            logs["ema_decay"] = d
