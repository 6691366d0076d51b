"""The pack loads the way a user installs it: a folder in ComfyUI's custom nodes, started by
ComfyUI's own main.py, with nothing of ours on sys.path (the in-process tests put the repo
root there, which would hide an import that only works from the repo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_harness import comfy_path

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

ROOT = Path(__file__).resolve().parents[2]


def test_comfyui_main_imports_the_pack_from_custom_nodes(tmp_path):
    packs = tmp_path / "custom_nodes"
    packs.mkdir()
    (packs / "ComfyUI-FlowTrain").symlink_to(ROOT, target_is_directory=True)
    config = tmp_path / "extra_paths.yaml"
    config.write_text(f"flowtrain_test:\n    custom_nodes: {packs}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import sys, runpy; sys.argv = ['main.py', '--cpu', '--quick-test-for-ci', '--database-url', "
        f"'sqlite:///:memory:', '--extra-model-paths-config', {str(config)!r}, '--output-directory', {str(tmp_path)!r}]; "
        "runpy.run_path('main.py', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=comfy_path(), env=env, capture_output=True, text=True,
                         timeout=300)
    log = out.stdout + out.stderr
    assert "ComfyUI-FlowTrain" in log, log[-3000:]
    assert "IMPORT FAILED" not in log and "Error while calling comfy_entrypoint" not in log, log[-3000:]
    assert out.returncode == 0, log[-3000:]
