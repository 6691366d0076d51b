"""Test-only ComfyUI node pack: seeded random CONDITIONING in place of a text encoder, a
CLIP that records what it encodes, and a seeded random LORA_MODEL.

Loaded only by the ComfyUI integration tests (through an extra ``custom_nodes`` folder);
never shipped with FlowTrain."""
from __future__ import annotations

import zlib

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


class SpyClip:
    """Answers like ``comfy.sd.CLIP`` (``tokenize``, ``encode_from_tokens``,
    ``encode_from_tokens_scheduled``) with seeded random embeddings of each text, and records
    every text it encodes in ``FlowTrainTestClip.encoded`` as ``(path, text)``: "direct" for
    ``encode_from_tokens`` (FlowTrain), "scheduled" for CLIPTextEncode's path."""

    def __init__(self, width: int, pooled_width: int, seed: int):
        self.width, self.pooled_width, self.seed = width, pooled_width, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cond_stage_model = torch.nn.Linear(4, 4)  # its weights are the encoder's identity

    def tokenize(self, text):
        return {"text": text}

    def _encode(self, text: str) -> dict:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")) ^ self.seed)
        cond = torch.randn(1, 5, self.width, generator=g)
        pooled = torch.randn(1, self.pooled_width, generator=g) if self.pooled_width else None
        return {"cond": cond, "pooled_output": pooled}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        FlowTrainTestClip.encoded.append(("direct", tokens["text"]))
        out = self._encode(tokens["text"])
        if return_dict:
            return out
        return (out["cond"], out["pooled_output"]) if return_pooled else out["cond"]

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        FlowTrainTestClip.encoded.append(("scheduled", tokens["text"]))
        out = self._encode(tokens["text"])
        cond = out.pop("cond")
        return [[cond, out]]


class FlowTrainTestClip(io.ComfyNode):
    """A CLIP that counts what it encodes (``SpyClip``), in place of a real text encoder."""

    encoded: list = []

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainTestClip", display_name="FlowTrain Test CLIP", category="FlowTrain/testing",
            inputs=[
                io.Int.Input("width", default=64, min=1, max=16384, tooltip="Context width (txt_in input size)."),
                io.Int.Input("pooled_width", default=0, min=0, max=16384, tooltip="Pooled vector width (0 = none)."),
                io.Int.Input("seed", default=0, min=0, max=2**31, control_after_generate=False, tooltip="Seed."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, width, pooled_width, seed) -> io.NodeOutput:
        return io.NodeOutput(SpyClip(width, pooled_width, seed))


class TestPackExtension(ComfyExtension):
    async def get_node_list(self):
        return [FlowTrainTestConditioning, FlowTrainTestLora, FlowTrainTestClip]


async def comfy_entrypoint():
    return TestPackExtension()
