"""Session fixtures for tests that run real ComfyUI in-process.

Every test here skips unless ``COMFYUI_PATH`` names a ComfyUI checkout (e.g.
``COMFYUI_PATH=/path/to/ComfyUI``). ComfyUI is imported once per session in CPU mode
(``harness.init_comfyui``); nodes are loaded only by tests that ask for ``comfy_nodes``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402


def _comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: these tests need a ComfyUI checkout (e.g. COMFYUI_PATH=/path/to/ComfyUI)")
    if not (Path(path) / "comfy" / "model_base.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_base.py)")
    return path


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI imported in CPU mode (no nodes loaded)."""
    harness.init_comfyui(_comfy_path())
    return harness


@pytest.fixture(scope="session")
def comfy_nodes(comfyui):
    """ComfyUI with its built-in nodes loaded (~8 s, once); returns the stub server."""
    return comfyui.init_comfyui(_comfy_path(), load_nodes=True)


@pytest.fixture(scope="session")
def bridge(comfyui):
    """The pack's ``nodes/bridge`` package, loaded by path (``harness.load_bridge``)."""
    return harness.load_bridge()


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Tiny random FLUX files (hidden 128, 1 double + 1 single block), written once."""
    root = tmp_path_factory.mktemp("tiny_flux")
    return {
        "flux1_dev": harness.write_tiny_flux(root / "flux1_dev.safetensors", "flux1", guidance=True, seed=1),
        "flux1_schnell": harness.write_tiny_flux(root / "flux1_schnell.safetensors", "flux1", guidance=False, seed=2),
        "flux2": harness.write_tiny_flux(root / "flux2.safetensors", "flux2", guidance=False, seed=3),
        "flux2_dev": harness.write_tiny_flux(root / "flux2_dev.safetensors", "flux2", guidance=True, seed=4),
    }


@pytest.fixture(scope="session")
def tiny_vae_file(tmp_path_factory):
    """A random FLUX.1 VAE (~72 MB, bf16), written once."""
    return harness.write_tiny_vae(tmp_path_factory.mktemp("tiny_vae") / "flux1_vae.safetensors", "flux1")
