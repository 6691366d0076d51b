"""FlowTrain: FLUX LoRA training nodes for ComfyUI.

ComfyUI imports this folder as a package. Importing it must be cheap and must work without
ComfyUI (tests import ``trainer_core`` on its own), so the nodes load only when ComfyUI
asks for them through ``comfy_entrypoint``.
"""
import os
import sys

WEB_DIRECTORY = "./web"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _expose_trainer_core() -> None:
    """The nodes import the engine as the top-level package ``trainer_core`` (as the tests
    and the command line do). Appended, not prepended: this folder's ``nodes`` package must
    never shadow ComfyUI's own ``nodes`` module."""
    if _HERE not in sys.path:
        sys.path.append(_HERE)


async def comfy_entrypoint():
    _expose_trainer_core()
    from .nodes import FlowTrainExtension

    return FlowTrainExtension()
