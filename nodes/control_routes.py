"""The Trainer node's buttons: pause, resume, save now and stop a run this server is
training, and its live state for the web extension (also after a page reload).

Two routes on ComfyUI's server, added once when the pack loads (``register``):

* ``POST /flowtrain/control/{node_id}`` with ``{"action": "pause" | "resume" | "save" | "stop"}``
  → 200 and the run's state, or a 4xx ``{"error": ...}`` that changed nothing;
* ``GET /flowtrain/state/{node_id}`` → 200 ``{node, state, phase, step, total, s_per_it, eta,
  lr, losses: [[step, loss], ...]}`` (the chart so far), or 404.

A run is named by the Trainer node's id only. ``LIVE`` holds the runs this process is
training: ``live_run(node_id)`` adds one when the Trainer starts and removes it when it ends
(finished, stopped, failed or cancelled). The actions go through the engine's control files
(``trainer_core.control.request``) in that run's folder, which the registry knows; no path
ever comes from a request."""
from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from trainer_core.control import ACTIONS, control_state, refusal, request

log = logging.getLogger(__name__)

CONTROL_PATH = "/flowtrain/control/{node_id}"
STATE_PATH = "/flowtrain/state/{node_id}"
STATE_EVENT = "flowtrain.state"
NODE_ID = re.compile(r"[0-9]{1,12}(:[0-9]{1,12}){0,16}")  # "7", or "12:5" inside a subgraph
_REGISTERED: dict = {}


def _finite(x) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


@dataclass
class LiveRun:
    """What the server knows of one Trainer while it trains (updated by ``TrainingProgress``)."""

    node_id: str
    run_dir: Optional[Path] = None  # known once the node built its config
    phase: str = "loading"
    step: int = 0
    total: int = 0
    lr: Optional[float] = None
    s_per_it: Optional[float] = None
    eta: Optional[float] = None
    losses: list = field(default_factory=list)  # [step, loss or None]
    created: set = field(default_factory=set)  # control files this server made (removed at the end)

    def on_step(self, step: int, total: int, logs: dict) -> None:
        self.step, self.total = step, total
        self.lr, self.s_per_it, self.eta = (_finite(logs.get(k)) for k in ("lr", "s_per_it", "eta"))
        self.losses.append([step, _finite(logs.get("loss"))])

    @property
    def state(self) -> str:
        return control_state(self.phase, self.run_dir) if self.run_dir is not None else "starting"

    def snapshot(self, history: bool = False) -> dict:
        out = {"node": self.node_id, "state": self.state, "phase": self.phase, "step": self.step, "total": self.total,
               "s_per_it": self.s_per_it, "eta": self.eta, "lr": self.lr}
        if history:
            out["losses"] = list(self.losses)
        return out


class LiveRuns:
    """node id → ``LiveRun`` of the Trainers this process is training (thread-safe: the
    prompt runs in ComfyUI's worker thread, the routes in its event loop)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runs: dict[str, LiveRun] = {}

    def get(self, node_id: str) -> Optional[LiveRun]:
        with self.lock:
            return self.runs.get(node_id)

    def act(self, node_id: str, action: str) -> tuple[int, dict]:
        """Apply ``action`` to the live run ``node_id``: ``(HTTP status, JSON body)``."""
        with self.lock:
            run = self.runs.get(node_id)
            if run is None:
                return 404, {"error": f"no FlowTrain Trainer with id {node_id} is training on this server"}
            why = refusal(run.phase, run.run_dir, action) if run.run_dir is not None else "the run is starting"
            if why:
                return 409, {"error": why, **run.snapshot()}
            request(run.run_dir, action)
            name = ACTIONS[action]
            (run.created.discard if action == "resume" else run.created.add)(name)
            log.info("FlowTrain Trainer %s: %s requested from the node", node_id, action)
            return 200, run.snapshot()

    @contextlib.contextmanager
    def live(self, node_id: Optional[str]) -> Iterator[LiveRun]:
        run = LiveRun(str(node_id) if node_id is not None else "")
        if node_id is not None:
            with self.lock:
                self.runs[run.node_id] = run
        try:
            yield run
        finally:
            with self.lock:
                if self.runs.get(run.node_id) is run:
                    del self.runs[run.node_id]
                for name in run.created:  # a request the run ended before acting on must not act on the next run
                    if run.run_dir is not None and (run.run_dir / name).exists():
                        (run.run_dir / name).unlink(missing_ok=True)
                        log.info("removed %s: the run ended before acting on it", run.run_dir / name)


LIVE = LiveRuns()
live_run = LIVE.live


def _json(status: int, body: dict):
    from aiohttp import web

    return web.json_response(body, status=status)


async def control(request):
    if request.method != "POST":
        return _json(405, {"error": f"use POST with a JSON body {{\"action\": one of {', '.join(ACTIONS)}}}"})
    node_id = request.match_info["node_id"]
    if not NODE_ID.fullmatch(node_id):
        return _json(400, {"error": "the node id must be a ComfyUI node id such as 7 or 12:5"})
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _json(400, {"error": "the body must be JSON: {\"action\": ...}"})
    action = body.get("action") if isinstance(body, dict) else None
    if not isinstance(action, str) or action not in ACTIONS:
        return _json(400, {"error": f"action must be one of {', '.join(ACTIONS)}"})
    status, out = LIVE.act(node_id, action)
    if status == 200:
        from .common import send_event

        send_event(STATE_EVENT, out)
    return _json(status, out)


async def state(request):
    if request.method != "GET":
        return _json(405, {"error": "use GET"})
    node_id = request.match_info["node_id"]
    if not NODE_ID.fullmatch(node_id):
        return _json(400, {"error": "the node id must be a ComfyUI node id such as 7 or 12:5"})
    run = LIVE.get(node_id)
    if run is None:
        return _json(404, {"error": f"no FlowTrain Trainer with id {node_id} is training on this server"})
    with LIVE.lock:
        return _json(200, run.snapshot(history=True))


def register(server) -> bool:
    """Add the routes to ComfyUI's ``PromptServer`` (once; every method, so a wrong one gets a
    JSON 405). False when there is no real server (in-process tests, scripts)."""
    routes = getattr(server, "routes", None)
    if routes is None or _REGISTERED.get("server") is server:
        return routes is not None
    routes.route("*", CONTROL_PATH)(control)
    routes.route("*", STATE_PATH)(state)
    _REGISTERED["server"] = server
    return True
