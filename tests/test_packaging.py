"""``pip install .`` gives a ``flowtrain`` command that works from any folder.

The wheel is built and installed into a fresh virtualenv without its dependencies; the
dependencies come from the test environment through a ``.pth`` file, so nothing is downloaded
and the engine imported is the installed one, not this checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def test_pip_install_gives_a_flowtrain_command(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # setuptools writes build/ and *.egg-info beside pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "trainer_core", source / "trainer_core", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "flowtrain_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(python), "-c", "import trainer_core; print(trainer_core.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    helped = _run([str(venv / "bin" / "flowtrain"), "--help"], cwd=elsewhere, env=env)
    assert "usage: flowtrain" in helped.stdout and "demo" in helped.stdout and "train" in helped.stdout
    sub = _run([str(venv / "bin" / "flowtrain"), "train", "--help"], cwd=elsewhere, env=env)
    assert "--model" in sub.stdout and "--data" in sub.stdout
    # the wheel holds the engine only, not the ComfyUI folder's other parts
    listing = _run([sys.executable, "-m", "zipfile", "-l", str(wheel)]).stdout
    assert "trainer_core/cli.py" in listing and "nodes/" not in listing and "tests/" not in listing
