"""FlowTrain: FLUX LoRA training nodes for ComfyUI.

ComfyUI imports this folder as a package. Importing it must be cheap and must work without
ComfyUI (tests import ``trainer_core`` on its own), so the nodes load only when ComfyUI
asks for them through ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FlowTrainExtension

    return FlowTrainExtension()
