"""FlowTrain's ComfyUI nodes (V3 API). ``FlowTrainExtension`` lists them; the pack's root
``__init__.py`` returns it from ``comfy_entrypoint``. ``nodes.specs`` is the pure part."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .data_nodes import (FlowTrainBucketer, FlowTrainCaptions, FlowTrainDataset, FlowTrainDopSettings,
                         FlowTrainLoraConfig, FlowTrainPreviewSettings)
from .lora_nodes import FlowTrainSaveLora
from .sampler_node import FlowTrainSamplerPreview
from .trainer import FlowTrainTrainer

NODES: list[type[io.ComfyNode]] = [
    FlowTrainDataset, FlowTrainBucketer, FlowTrainCaptions, FlowTrainLoraConfig, FlowTrainDopSettings,
    FlowTrainPreviewSettings, FlowTrainTrainer, FlowTrainSaveLora, FlowTrainSamplerPreview,
]


class FlowTrainExtension(ComfyExtension):
    async def on_load(self) -> None:
        """The Trainer's control and state routes (``control_routes``) on ComfyUI's server."""
        from server import PromptServer

        from .control_routes import register

        register(getattr(PromptServer, "instance", None))

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
