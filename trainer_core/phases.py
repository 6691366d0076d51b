"""What a run is doing right now, for hosts that show it: the phase seam.

A run moves through ``PHASES``: ``loading`` (scan the folder, read headers), ``encoding
images`` and ``encoding captions`` (the caching before step 1, often most of a short run),
``training``, and, interleaved with training, ``previews``, ``saving`` and ``paused`` (a
``.pause`` control file); ``stopping`` once a stop request is seen; ``done`` at the end.

``PhaseFn = (phase, n, total, info) -> None`` is what a host passes to
``session.train_lora(phase_progress=...)``: the ComfyUI node turns it into its progress bar,
node text and a ``flowtrain.phase`` event for the live chart, the command line into a
status line. ``n``/``total`` count the phase's items (images or texts encoded; 0/0 for a
phase without items); ``info`` holds ``rate`` (items per second since the phase began, or
None before the first item) and ``eta`` (seconds, or None).

``PhaseReporter`` wraps a ``PhaseFn`` (or none): it adds ``rate``/``eta``, logs a line at
the start and end of each counted phase and at most every ``log_every_s`` seconds in
between, so logs show the caching too. Callbacks reach it as ``state.extra["phase"]``
(``enter(state, name)``); ``paused_s`` is the time the run spent paused.

``StepRate`` gives the seconds per optimizer step (s/it) and the time left (ETA) that the
hosts show beside the step counter.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

PHASES = ("loading", "encoding images", "encoding captions", "training", "previews", "saving", "paused", "stopping",
          "done")
PhaseFn = Callable[[str, int, int, dict], None]


class PhaseReporter:
    """``reporter(phase, n, total)``: reports a phase's progress to ``fn`` with rate and ETA.

    A call with a new phase name starts that phase's clock; the rate is measured from
    that moment, so the first call of a phase should be ``n=0``."""

    def __init__(self, fn: Optional[PhaseFn] = None, *, log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.fn, self.log_every_s, self.clock = fn, log_every_s, clock
        self.phase: Optional[str] = None
        self.t0 = self.last_log = 0.0
        self._paused_before = 0.0  # seconds in earlier pauses

    @property
    def paused_s(self) -> float:
        """Seconds spent in the ``paused`` phase so far (the current pause included)."""
        now = self.clock() - self.t0 if self.phase == "paused" else 0.0
        return self._paused_before + now

    def __call__(self, phase: str, n: int = 0, total: int = 0, **extra: Any) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        now = self.clock()
        if phase != self.phase:
            if self.phase == "paused":
                self._paused_before += now - self.t0
            self.phase, self.t0, self.last_log = phase, now, now
        elapsed = now - self.t0
        rate = n / elapsed if n > 0 and elapsed > 0 else None
        eta = (total - n) / rate if rate and total >= n else None
        info = {"rate": rate, "eta": eta, **extra}
        if total and (n == 0 or n >= total or now - self.last_log >= self.log_every_s):
            self.last_log = now
            log.info("%s %d/%d%s", phase, n, total, describe(info))
        if self.fn is not None:
            self.fn(phase, n, total, info)

    def counter(self) -> Callable[[int, int, str], None]:
        """The ``(n, total, phase)`` callable the data caches call."""
        return lambda n, total, phase: self(phase, n, total)


class StepRate:
    """Seconds per optimizer step over the last ``window`` steps, measured on the wall clock
    between step ends (previews and saves count, the time spent paused does not), and the
    time left at that pace. ``rate(step, total, paused_s)`` is called once per finished step;
    before a second step it reports the first step's own duration (``first_s``)."""

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.marks: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, active seconds)

    def __call__(self, step: int, total: int, paused_s: float = 0.0,
                 first_s: Optional[float] = None) -> tuple[Optional[float], Optional[float]]:
        """``(seconds per step, seconds left)``; ``(None, None)`` while unknown."""
        self.marks.append((step, self.clock() - paused_s))
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        per_step = (t1 - t0) / (s1 - s0) if s1 > s0 else first_s
        if per_step is None or per_step < 0:
            return None, None
        return per_step, per_step * max(total - step, 0)


def duration(seconds: float) -> str:
    """``"12s"``, ``"1m35s"``, ``"1h06m"``: a time left as people read it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def step_timing(s_per_it: Optional[float], eta: Optional[float]) -> str:
    """``"0.42s/it, ETA 1m35s"`` (``"2.38it/s"`` when faster than a step a second), or ``""``."""
    if s_per_it is None:
        return ""
    speed = f"{s_per_it:.2f}s/it" if s_per_it >= 1 or s_per_it == 0 else f"{1 / s_per_it:.2f}it/s"
    return f"{speed}, ETA {duration(eta)}" if eta is not None else speed


def describe(info: dict) -> str:
    """``" (3.1/s, ETA 9s)"`` from a phase's info, or ``""`` without a rate yet."""
    rate, eta = info.get("rate"), info.get("eta")
    if not rate:
        return ""
    speed = f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f}s each"
    return f" ({speed}, ETA {duration(eta)})" if eta is not None else f" ({speed})"


def enter(state: Any, phase: str) -> None:
    """Report ``phase`` for a run (``state.extra["phase"]``, set by ``train_lora``); no-op without one."""
    reporter = getattr(state, "extra", {}).get("phase")
    if reporter is not None:
        reporter(phase)


@contextlib.contextmanager
def during(state: Any, phase: str):
    """``phase`` while the block runs, then the phase before it again (previews and saves
    interrupt training)."""
    reporter = getattr(state, "extra", {}).get("phase")
    before = getattr(reporter, "phase", None)
    if before == phase:  # nested (a checkpoint save writes the LoRA through the LoRA saver)
        yield
        return
    enter(state, phase)
    try:
        yield
    finally:
        if before is not None:
            enter(state, before)
