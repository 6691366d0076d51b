"""Save LoRA: a LORA_MODEL into ComfyUI's ``loras`` folder, atomically, under a name that
cannot leave that folder, so LoraLoader lists it without a restart (its file list is
refreshed when the folder changes)."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

from trainer_core import FORMAT_VERSION

from . import specs
from .common import CATEGORY


def lora_destination(name: str) -> str:
    """Full path for ``name`` in the first ``loras`` folder (validated by ``specs``)."""
    import folder_paths

    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, specs.safe_lora_filename(name))


def save_lora_tensors(lora: dict, path: str) -> str:
    from trainer_core.lora.io import save_lora_file

    if not lora:
        raise ValueError("the LoRA to save is empty; connect the Trainer's LORA output")
    metadata = dict(getattr(lora, "metadata", {}) or {})
    metadata.setdefault("flowtrain.format_version", str(FORMAT_VERSION))
    metadata["flowtrain.saved_by"] = "FlowTrainSaveLora"
    save_lora_file(path, dict(lora), {str(k): str(v) for k, v in metadata.items()})
    return path


class FlowTrainSaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainSaveLora", display_name="FlowTrain Save LoRA", category=CATEGORY, is_output_node=True,
            description="Writes a LoRA into ComfyUI's loras folder (replacing a file of the same name), "
                        "where Load LoRA lists it.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to save (the Trainer's LORA output)."),
                io.String.Input("name", default="flowtrain_lora", tooltip=(
                    "File name inside models/loras (no folders or '..'); .safetensors is added. "
                    "An existing file of this name is replaced.")),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The file name as LoraLoader lists it.")],
            search_aliases=["flowtrain", "save lora", "export lora", "lora to models/loras"],
        )

    @classmethod
    def execute(cls, lora, name) -> io.NodeOutput:
        path = save_lora_tensors(lora, lora_destination(name))
        filename = os.path.basename(path)
        return io.NodeOutput(filename, ui=ui.PreviewText(f"saved {path}"))
