"""A real ComfyUI server (its own ``main.py``) in a subprocess on a free localhost port,
with FlowTrain and the test-only pack as custom nodes, tiny random FLUX.1-dev files and a
3-image dataset: for tests that talk to ComfyUI over HTTP (the Trainer's control routes)
and for the headless-browser check of the node's buttons (``test_browser_controls.py``).

``start_server(root, comfy_path)`` returns a ``ComfyServer`` (``get``/``post``/``queue``/
``history``/``stop``); ``training_graph(server, name, steps)`` is the FLUX.1-dev example
workflow (API form) shrunk to the tiny files, CONDITIONING in place of the text encoders.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness import write_tiny_flux, write_tiny_vae
from workflow_harness import HERE, ROOT, load_api_workflow, shrink, use_test_conditioning, write_dataset

UNET, VAE = "tiny_flux1_dev.safetensors", "tiny_flux1_vae.safetensors"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    root: Path
    process: subprocess.Popen
    log_path: Path

    def call(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> tuple[int, Any]:
        """``(HTTP status, parsed JSON or text)``; a 4xx/5xx is returned, not raised."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None, raw: Optional[bytes] = None) -> tuple[int, Any]:
        return self.call("POST", path, body, raw)

    def queue(self, graph: dict) -> str:
        status, out = self.post("/prompt", {"prompt": graph, "client_id": "flowtrain-tests"})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph ({status}): {out}")
        return out["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        status, out = self.get(f"/history/{prompt_id}")
        return out.get(prompt_id) if status == 200 and isinstance(out, dict) else None

    def wait_for_history(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.history(prompt_id)
            if found and found.get("status", {}).get("completed") is not None and found["status"].get("status_str"):
                return found
            self.check_alive()
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def wait_for_prompt_id(self, timeout: float = 300) -> str:
        """The id of the first prompt in ``/history`` (one queued from a browser), once it ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, out = self.get("/history")
            if status == 200 and out:
                return next(iter(out))
            self.check_alive()
            time.sleep(0.5)
        raise TimeoutError(f"no prompt finished in {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({self.process.returncode}); log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_server(root: Path, comfy_path: str, timeout: float = 300) -> ComfyServer:
    """ComfyUI's ``main.py`` on CPU, listening on a free 127.0.0.1 port, everything it writes
    (user settings, input, output, temp) under ``root``; returns once FlowTrain's Trainer is
    in ``/object_info``."""
    root = Path(root)
    packs, models = root / "packs", root / "models"
    for d in (packs, models, root / "input", root / "output", root / "temp", root / "user"):
        d.mkdir(parents=True, exist_ok=True)
    for name, target in (("flowtrain", ROOT), ("flowtrain_test_pack", HERE / "test_pack")):
        if not (packs / name).exists():
            (packs / name).symlink_to(target, target_is_directory=True)
    if not (models / UNET).exists():
        write_tiny_flux(models / UNET, "flux1", guidance=True, context_dim=64, vec_dim=32)
        write_tiny_vae(models / VAE, "flux1")
    write_dataset(root / "input" / "flowtrain_dataset")
    config = root / "extra_model_paths.yaml"
    config.write_text(f"flowtrain_tests:\n    custom_nodes: {packs}\n    diffusion_models: {models}\n    vae: {models}\n")
    port = free_port()
    log_path = root / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(config),
           "--output-directory", str(root / "output"), "--input-directory", str(root / "input"),
           "--temp-directory", str(root / "temp"), "--user-directory", str(root / "user"), "--disable-auto-launch"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=comfy_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", root, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            status, out = server.get("/object_info/FlowTrainTrainer")
            if status == 200 and "FlowTrainTrainer" in out:
                return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"ComfyUI did not serve FlowTrain within {timeout:.0f}s; log tail:\n{server.log_tail()}")


def training_graph(server: ComfyServer, output_name: str, steps: int) -> dict:
    """The FLUX.1-dev example, tiny, previews off, saving its LoRA under ``output_name``."""
    graph = use_test_conditioning(load_api_workflow("flux1_dev_subject_lora"), width=64, pooled=32)
    return shrink(graph, unet=UNET, vae=VAE, dataset=server.root / "input" / "flowtrain_dataset",
                  output_name=output_name, steps=steps, preview_every=0)
