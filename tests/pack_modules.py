"""Load one of the pack's own files by path, without importing the ``nodes`` package (that
would need ComfyUI, and ``nodes`` is also the name of ComfyUI's own module)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
"""The pack's root folder (the custom node folder)."""


def load_by_path(name: str, path: Path) -> ModuleType:
    """The module in ``path``, executed afresh and registered as ``sys.modules[name]``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
