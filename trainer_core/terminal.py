"""What the command line shows while it trains: one status line (caching counts, then step,
loss, speed and ETA) that log messages never collide with.

On a terminal the status line updates in place and every log record first clears it, prints
itself on its own line, then redraws it. When stderr is not a terminal (a log file, CI, a
pipe) there is no updating line: the status is printed as plain lines, every 5 % of the steps
and at the ends of each caching phase (or at most every ``PLAIN_EVERY_S`` seconds while one
runs), so a log file stays readable.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

PLAIN_EVERY_S = 10.0


class StatusLine:
    """The one updating line on stderr (looked up at each write, so redirections apply)."""

    def __init__(self) -> None:
        self.text = ""

    @property
    def stream(self):
        return sys.stderr

    @property
    def live(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def show(self, text: str, *, final: bool = False, plain: bool = True) -> None:
        """``text`` as the status; ``final`` ends the line. Without a terminal it is written
        as a plain line when ``plain`` (the caller's throttle) or ``final``."""
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.text = "" if final else text
        elif plain or final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.text and self.live:
            self.stream.write("\r\033[K")

    def redraw(self) -> None:
        if self.text and self.live:
            self.stream.write(self.text)
            self.stream.flush()


STATUS = StatusLine()


class _AroundStatus(logging.StreamHandler):
    """A stderr handler that prints each record on a line of its own, below the status line."""

    def __init__(self, status: StatusLine):
        super().__init__()
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(self.status.stream)
        self.status.clear()
        super().emit(record)
        self.status.redraw()


def log_handler() -> logging.Handler:
    return _AroundStatus(STATUS)


class TerminalProgress:
    """Step, loss, its moving average, speed and ETA. Speed is measured from the first step
    reported (caching and sampling before it do not count)."""

    def __init__(self, status: StatusLine = STATUS) -> None:
        self.status = status
        self.start: tuple[int, float] | None = None
        self.avg: float | None = None

    def __call__(self, step: int, total: int, logs: dict) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = (step - 1, now - logs.get("seconds", 0.0))
        loss = logs["loss"]
        self.avg = loss if self.avg is None else 0.95 * self.avg + 0.05 * loss
        rate = (now - self.start[1]) / max(step - self.start[0], 1)
        eta = rate * (total - step)
        every = max(1, total // 20)
        self.status.show(f"  step {step:>5}/{total}  loss {loss:.4f}  avg {self.avg:.4f}  {rate:.3f}s/step  "
                         f"eta {eta:4.0f}s", final=step == total, plain=step % every == 0 or step == self.start[0] + 1)


class TerminalPhases:
    """The caching before step 1 (``encoding images 12/40 (3.1/s, ETA 9s)``), ended when the
    phase is done, so a slow start does not look like a hang. Phases without counts are left
    to the log."""

    def __init__(self, status: StatusLine = STATUS) -> None:
        self.status = status
        self.last = 0.0

    def __call__(self, phase: str, n: int, total: int, info: dict) -> None:
        from .phases import describe

        if not total:
            return
        now = time.monotonic()
        plain = n == 0 or now - self.last >= PLAIN_EVERY_S
        if plain:
            self.last = now
        self.status.show(f"  {phase} {n}/{total}{describe(info)}", final=n >= total, plain=plain)


THIRD_PARTY = ("transformers", "diffusers", "huggingface_hub", "bitsandbytes", "accelerate", "torchao")


def quiet_libraries(verbose: bool) -> None:
    """Unless ``verbose``: no third-party chatter on every start (bitsandbytes' kernels note,
    transformers/diffusers loading bars and advisory warnings, their Python warnings). Set
    before those libraries are imported, which read their verbosity from the environment."""
    if verbose:
        return
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in THIRD_PARTY:
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")
    for module_name in ("transformers", "diffusers"):  # already imported (e.g. by the demo): switch them now
        module = sys.modules.get(module_name)
        utils = getattr(getattr(module, "utils", None), "logging", None)
        if utils is not None:
            utils.set_verbosity_error()
            utils.disable_progress_bar()
