"""Test-only ComfyUI node pack: seeded random CONDITIONING in place of a text encoder.

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


class TestPackExtension(ComfyExtension):
    async def get_node_list(self):
        return [FlowTrainTestConditioning]


async def comfy_entrypoint():
    return TestPackExtension()
