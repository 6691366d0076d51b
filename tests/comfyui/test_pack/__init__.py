"""Test-only ComfyUI node pack: seeded random CONDITIONING in place of a text encoder, and a
seeded random LORA_MODEL.

Loaded only by the ComfyUI integration tests (through an extra ``custom_nodes`` folder);
never shipped with FlowTrain."""
from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io


class FlowTrainTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainTestConditioning", display_name="FlowTrain Test Conditioning", category="FlowTrain/testing",
            inputs=[
                io.Int.Input("width", default=64, min=1, max=16384, tooltip="Context width (txt_in input size)."),
                io.Int.Input("length", default=7, min=1, max=1024, tooltip="Number of tokens."),
                io.Int.Input("pooled_width", default=0, min=0, max=16384, tooltip="Pooled vector width (0 = none, FLUX.2)."),
                io.Int.Input("seed", default=0, min=0, max=2**31, control_after_generate=False, tooltip="Seed."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, width, length, pooled_width, seed) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, length, width, generator=g)
        extra = {}
        if pooled_width:
            extra["pooled_output"] = torch.randn(1, pooled_width, generator=g)
        return io.NodeOutput([[context, extra]])


class FlowTrainTestLora(io.ComfyNode):
    """A seeded random LoRA (``diffusion_model.<module>.lora_up/lora_down.weight`` + ``alpha``)
    over every Linear of the MODEL: a LORA_MODEL without training."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainTestLora", display_name="FlowTrain Test LoRA", category="FlowTrain/testing",
            inputs=[
                io.Model.Input("model", tooltip="The model whose Linear layers get a LoRA."),
                io.Int.Input("rank", default=2, min=1, max=64, tooltip="LoRA rank (alpha = rank: scale 1)."),
                io.Float.Input("std", default=0.05, min=0.0, max=10.0, tooltip="Std of the random A and B."),
                io.Int.Input("seed", default=0, min=0, max=2**31, control_after_generate=False, tooltip="Seed."),
            ],
            outputs=[io.LoraModel.Output()],
        )

    @classmethod
    def execute(cls, model, rank, std, seed) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        lora = {}
        for name, module in model.model.diffusion_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                stem = f"diffusion_model.{name}"
                lora[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * std
                lora[f"{stem}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * std
                lora[f"{stem}.alpha"] = torch.tensor(float(rank))
        return io.NodeOutput(lora)


class TestPackExtension(ComfyExtension):
    async def get_node_list(self):
        return [FlowTrainTestConditioning, FlowTrainTestLora]


async def comfy_entrypoint():
    return TestPackExtension()
