"""The command line's status line and --device."""
from __future__ import annotations

import io
import logging

import pytest
import torch

from trainer_core.cli import resolve_device
from trainer_core.terminal import StatusLine, TerminalPhases, TerminalProgress, log_handler


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_plain_periodic_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    progress = TerminalProgress(StatusLine())
    for step in range(1, 101):
        progress(step, 100, {"loss": 1.0, "seconds": 0.01})
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert len(lines) == 21  # the first step, then every 5 %
    assert lines[0].strip().startswith("step     1/100") and lines[-1].strip().startswith("step   100/100")


def test_without_a_terminal_caching_prints_its_ends(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    phases = TerminalPhases(StatusLine())
    for n in range(0, 41, 4):
        phases("encoding images", n, 40, {"rate": 4.0, "eta": (40 - n) / 4})
    lines = err.getvalue().splitlines()
    assert lines[0].strip().startswith("encoding images 0/40") and lines[-1].strip().startswith("encoding images 40/40")
    assert len(lines) == 2  # fast phases: the start and the end only


def test_on_a_terminal_log_records_never_join_the_status_line(monkeypatch):
    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    status = StatusLine()
    logger = logging.getLogger("flowtrain-terminal-test")
    logger.propagate, logger.level = False, logging.INFO
    handler = log_handler()
    handler.status = status
    logger.addHandler(handler)
    try:
        progress = TerminalProgress(status)
        progress(1, 10, {"loss": 0.5, "seconds": 0.1})
        logger.info("checkpoint saved")
        progress(2, 10, {"loss": 0.4, "seconds": 0.1})
    finally:
        logger.removeHandler(handler)
    # what a terminal shows: each \r\033[K wipes the line, so split on it and on newlines
    shown = [seg for line in err.getvalue().split("\n") for seg in [line.split("\r\033[K")[-1]]]
    assert "checkpoint saved" in shown  # the record is a line of its own, not glued to the status
    assert shown[-1].strip().startswith("step     2/10")


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has 0 CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu-ish")
