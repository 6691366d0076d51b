"""File-based control of a running training, and a watch on the dataset folder.

Create one of these empty files in the run folder (``touch <run>/.pause``):

* ``.checkpoint``: save a checkpoint after the current step, render the run's previews (when it
  has any: the callbacks with an ``on_save_now(state)`` hook, e.g. ``PreviewCallback``, into
  ``previews/step_XXXXXX/``) and continue (the file is removed);
* ``.pause``: save a checkpoint, then wait until the file is removed (a Cancel / Ctrl+C
  or a ``.stop`` file while paused still stops the run);
* ``.stop``: end after the current step: a checkpoint and ``lora_final`` are written
  (the file is removed, so a later resume does not stop at once).

The files are checked after every optimizer step, so they act within one step. While the
run waits in a pause they are checked every ``POLL_S`` seconds.

Hosts with buttons (the ComfyUI node's Pause / Resume / Save now / Stop) go through the same
files: ``request(run_dir, action)`` creates or removes one, ``control_state`` tells what the
run is doing from its phase (``phases.py``) and the files still waiting to be acted on.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from .loop import Callback, RunState, StopTraining
from .phases import during, enter

log = logging.getLogger(__name__)

PAUSE, CHECKPOINT, STOP = ".pause", ".checkpoint", ".stop"
POLL_S = 1.0  # how often a pause checks for the file's removal and for a stop request
ACTIONS = {"pause": PAUSE, "resume": PAUSE, "save": CHECKPOINT, "stop": STOP}
"""A host's control actions → the file each one creates (``resume`` removes ``.pause``)."""
STATES = ("starting", "running", "pausing", "paused", "resuming", "saving", "stopping", "done")
"""What ``control_state`` reports: before step 1 ``starting``; ``pausing``/``resuming``/``stopping``
while a request waits for the end of the step in progress (or the next poll of a pause)."""
_TRAINING_PHASES = ("training", "previews", "saving", "paused", "stopping")


def request(run_dir: Path | str, action: str) -> None:
    """Ask a running training to ``pause``, ``resume``, ``save`` (a checkpoint now) or
    ``stop``: creates (or, for ``resume``, removes) the control file in ``run_dir``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown control action {action!r}; actions: {', '.join(ACTIONS)}")
    path = Path(run_dir) / ACTIONS[action]
    if action == "resume":
        path.unlink(missing_ok=True)
    else:
        path.touch()


def refusal(phase: str | None, run_dir: Path | str, action: str) -> str:
    """Why ``action`` does not fit the run now ("" when it does): nothing to control before
    the training starts or after a stop request, no resume unless paused, no second pause."""
    if action not in ACTIONS:
        return f"unknown action {action!r}; actions: {', '.join(ACTIONS)}"
    state = control_state(phase, run_dir)
    if state in ("starting", "done"):
        return f"the run is {state}: nothing to {action}"
    if state == "stopping":
        return "the run is stopping"
    paused = (Path(run_dir) / PAUSE).exists()
    if action == "resume" and not paused:
        return "the run is not paused"
    if action == "pause" and paused:
        return f"the run is already {state}"
    return ""


def control_state(phase: str | None, run_dir: Path | str) -> str:
    """One of ``STATES`` for a run in ``phase`` whose control files are in ``run_dir``."""
    run_dir = Path(run_dir)
    if phase == "done":
        return "done"
    if phase not in _TRAINING_PHASES:
        return "starting"
    if phase == "stopping" or (run_dir / STOP).exists():
        return "stopping"
    paused = (run_dir / PAUSE).exists()
    if phase == "paused":
        return "paused" if paused else "resuming"
    if phase == "saving" or (run_dir / CHECKPOINT).exists():
        return "saving"
    return "pausing" if paused else "running"


class ControlCallback(Callback):
    """Acts on the control files; ``save(state)`` writes a checkpoint (``CheckpointCallback.save``).
    A save request (``.checkpoint``) then calls ``on_save_now(state)`` on each of ``callbacks``
    that has it (the run's previews)."""

    def __init__(self, run_dir: Path, save: Callable[[RunState], Path], should_stop: Callable[[], bool],
                 poll_s: float | None = None, callbacks: Sequence[object] = ()):
        self.run_dir, self.save, self.should_stop = Path(run_dir), save, should_stop
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.on_save_now = [cb.on_save_now for cb in callbacks if callable(getattr(cb, "on_save_now", None))]

    def on_train_start(self, state: RunState) -> None:
        stale = self.run_dir / STOP
        if stale.exists():
            log.warning("removing %s left from an earlier run (create it again to stop this one)", stale)
            stale.unlink(missing_ok=True)

    def on_step_end(self, state: RunState, logs: dict) -> None:
        self.stop_if_asked(state)
        self.save_if_asked(state)
        if (self.run_dir / PAUSE).exists():
            self.pause(state)

    def stop_if_asked(self, state: RunState) -> None:
        if (self.run_dir / STOP).exists():
            (self.run_dir / STOP).unlink(missing_ok=True)
            log.info("%s found: stopping after step %d", self.run_dir / STOP, state.step)
            enter(state, "stopping")
            raise StopTraining("stopped (.stop file)")

    def save_if_asked(self, state: RunState) -> None:
        if (self.run_dir / CHECKPOINT).exists():
            folder = self.save(state)  # while paused: the pause's own checkpoint (same step), not a second one
            log.info("%s found: saved %s", self.run_dir / CHECKPOINT, folder)
            for hook in self.on_save_now:  # previews: after the checkpoint, so a failure here cannot lose it
                hook(state)
            (self.run_dir / CHECKPOINT).unlink(missing_ok=True)

    def pause(self, state: RunState) -> None:
        folder = self.save(state)
        log.info("paused after step %d (checkpoint %s); delete %s to continue", state.step, folder,
                 self.run_dir / PAUSE)
        cancelled = False
        with during(state, "paused"):
            while (self.run_dir / PAUSE).exists() and not (self.run_dir / STOP).exists():
                if self.should_stop():
                    cancelled = True
                    break
                self.save_if_asked(state)
                time.sleep(self.poll_s)
        if cancelled:
            raise StopTraining("stopped")
        self.stop_if_asked(state)
        log.info("resuming after the pause")


FolderSnapshot = dict[str, tuple[int, int]]


def folder_snapshot(path: Path | str) -> FolderSnapshot:
    """relative path → (size, mtime_ns) of every non-hidden file under ``path`` that the
    dataset scan may read (symbolic links leading outside the folder are not followed)."""
    from .data.scan import walk_files

    root = Path(path).expanduser()
    if not root.is_dir():
        return {}
    out: FolderSnapshot = {}
    for p in walk_files(root):
        try:
            st = p.stat()
        except OSError:
            continue
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def snapshot_changes(before: FolderSnapshot, after: FolderSnapshot) -> list[str]:
    """Human-readable list of added, removed and modified files."""
    added = [f"added {k}" for k in sorted(set(after) - set(before))]
    removed = [f"removed {k}" for k in sorted(set(before) - set(after))]
    changed = [f"modified {k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return added + removed + changed


class DatasetWatchCallback(Callback):
    """Warns at the end when the dataset folder changed while training. The run itself is
    unaffected: every latent and caption was cached before step 1."""

    def __init__(self, data_path: Path | str, before: FolderSnapshot):
        self.path, self.before = Path(data_path), before
        self.changes: list[str] = []

    def on_train_end(self, state: RunState, reason: str) -> None:
        self.changes = snapshot_changes(self.before, folder_snapshot(self.path))
        if self.changes:
            log.warning("the dataset folder %s changed during training; this run used the images and captions "
                        "as they were when it started (all were cached before step 1). Train again to use the "
                        "changes:%s", self.path, "".join(f"\n  {c}" for c in self.changes))
