"""Let PyPI's CUDA-only torchvision wheel import next to a CPU-only torch.

torchvision's CUDA build cannot load its ``_C`` extension on CPU torch, so the
``torchvision::nms`` / ``torchvision::qnms`` operators never get a schema and
``import torchvision`` dies in ``_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``.

This module defines those two schemas (no kernels) before torchvision is
imported. torchvision's Python parts (transforms, models, io helpers that do not
need _C) then work; compiled ops (torchvision.ops.nms, roi_align, deform_conv2d)
raise "Couldn't load custom C++ ops" when called.

Use either
    import comfyui_tv_shim; comfyui_tv_shim.install()  # lazy: acts when torchvision is imported
or
    import comfyui_tv_shim; comfyui_tv_shim.apply()    # eager: imports torch now

``install()`` does not import torch, so ComfyUI's main.py does not warn about
"Torch already imported". Both are idempotent and do nothing when torchvision's
own extension loads (a matching CPU wheel) or torchvision is already imported.
"""

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIB = None  # keep the torch.library.Library alive, or the schemas are dropped again
_APPLIED = False


def _torchvision_ext_loads(torch):
    """True when torchvision's own _C extension loads (then no shim is needed)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for loc in spec.submodule_search_locations:
        for so in glob.glob(os.path.join(loc, "_C*.so")) + glob.glob(os.path.join(loc, "_C*.pyd")):
            try:
                torch.ops.load_library(so)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def apply():
    """Define the torchvision::nms/qnms schemas now (imports torch). Idempotent."""
    global _LIB, _APPLIED
    if _APPLIED or "torchvision" in sys.modules:
        return
    _APPLIED = True
    import torch

    if _torchvision_ext_loads(torch):
        return
    try:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        # someone else defined them already
        pass


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()
            apply()
        return None  # let the normal finders import it


_HOOK = _Hook()


def install():
    """Apply the shim lazily, right before the first `import torchvision`."""
    if "torchvision" in sys.modules or _APPLIED:
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall():
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
