"""Placeholders for packages ComfyUI imports at module level but the GPU benchmark never uses.

A device machine may lack some of ComfyUI's requirements and has no internet; the big ones
(PyAV, SciPy, Pillow, torchvision, torchaudio: 3-35 MB wheels each, built per Python and
torch version) do not fit the 64 MiB that travels with a run. ``gpu_scale.py`` loads a FLUX model from a state dict, trains it
and runs the built-in Train LoRA node: none of that calls into these packages, ComfyUI only
imports them (video types, the beta scheduler, image helpers, SDE noise, other model
families' layers). ``install`` puts
an empty placeholder module in place of each *missing* one (a present package is never
replaced, unless ``force`` names it, which the CPU test uses to prove the path needs none of
them). Using a placeholder (calling it, or reading anything but module plumbing from it)
raises ``ModuleNotFoundError`` naming the package, so nothing fails silently.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

log = logging.getLogger("gpu_scale")

OPTIONAL = ("av", "scipy", "PIL", "torchsde", "torchvision", "torchaudio")


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(f"{self._name} is a placeholder (benchmarks/device_imports.py): the package is not "
                                  "installed on this machine")

    def __mro_entries__(self, bases):  # ``class X(placeholder.Base)`` at import time
        return (object,)

    def __or__(self, other):  # ``placeholder.Type | None`` in annotations evaluated at import
        return self

    __ror__ = __or__

    def __getitem__(self, item):  # ``Generic[placeholder.Type]``
        return self


class _Placeholder(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def install(force: tuple[str, ...] = ()) -> list[str]:
    """Placeholders for the ``OPTIONAL`` packages that are not installed (and for ``force``);
    returns their names."""
    roots = {name for name in OPTIONAL if name in force or importlib.util.find_spec(name) is None}
    for name in list(sys.modules):
        if name.split(".")[0] in roots:
            del sys.modules[name]
    if roots:
        sys.meta_path.insert(0, _Finder(roots))
        log.warning("placeholders for packages not installed here (never called by this benchmark): %s",
                    ", ".join(sorted(roots)))
    return sorted(roots)
