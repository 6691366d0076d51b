"""The registry metadata and package: ``requires-comfyui`` in ``[tool.comfy]``, and what
``comfy node pack`` would archive (git-tracked files minus ``.comfyignore``, git's own pattern
matching) leaves out tests, CI and benchmarks but keeps everything the pack runs on."""
from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_comfyui_range_and_no_second_web_folder():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"].startswith(">=")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # ComfyUI would serve web/ a second time under the project name (see the comment there)
    assert "web" not in comfy


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_registry_package_leaves_out_tests_ci_and_benchmarks():
    tracked = set(_git("ls-files", "-c"))
    ignored = set(_git("ls-files", "-c", "-i", "--exclude-from=.comfyignore"))
    packed = tracked - ignored
    for folder in ("tests/", ".ci/", ".github/", "benchmarks/", "scripts/"):
        assert not [p for p in packed if p.startswith(folder)], folder
    needed = {"__init__.py", "pyproject.toml", "README.md", "requirements.txt", "web/flowtrain.js",
              "nodes/trainer.py", "trainer_core/config.py", "LICENSE"} & tracked
    assert needed <= packed and "nodes/trainer.py" in packed
    assert any(p.startswith("example_workflows/") and p.endswith(".json") for p in packed)
