"""FlowTrain Sampler Preview in grid mode (columns = LoRA strengths) in a real, in-process
ComfyUI, checked against ComfyUI's own nodes: the strength-0 column is KSampler on the base
model, the strength-1 column KSampler on core "Load LoRA Model" at strength 1.

Without a CLIP the node renders its positive CONDITIONING as the one row (rows = prompts
needs a text encoder). Needs ``COMFYUI_PATH``."""
from __future__ import annotations

import pytest
import torch

from workflow_harness import comfy_path

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

from test_workflows import CASES, env  # noqa: E402,F401  (shared session fixture and models)

SIZE, STRENGTHS = 64, (0.0, 0.5, 1.0)


def core_sample(model: str, first: int) -> dict:
    """KSampler → VAEDecode → PreviewImage on ``model`` as the Sampler preview samples a
    guidance-distilled model: FluxGuidance 3.5 at cfg 1, 2 euler steps, seed 0."""
    a, b, c, d, e = (str(first + i) for i in range(5))
    return {
        a: {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        b: {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        c: {"class_type": "KSampler", "inputs": {"model": [model, 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "simple", "positive": [a, 0],
                                                 "negative": [b, 0], "latent_image": ["8", 0], "denoise": 1.0}},
        d: {"class_type": "VAEDecode", "inputs": {"samples": [c, 0], "vae": ["2", 0]}},
        e: {"class_type": "PreviewImage", "inputs": {"images": [d, 0]}},
    }


def test_grid_columns_are_lora_strengths(env):  # noqa: F811
    import harness

    case = CASES["flux1_dev_subject_lora"]
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": case["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": case["vae"]}},
        "3": {"class_type": "FlowTrainTestConditioning", "inputs": {"width": 64, "length": 7, "pooled_width": 32,
                                                                    "seed": 1}},
        "4": {"class_type": "FlowTrainTestLora", "inputs": {"model": ["1", 0], "rank": 2, "std": 0.1, "seed": 0}},
        "5": {"class_type": "FlowTrainSamplerPreview", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "positive": ["3", 0], "lora": ["4", 0], "prompts": "a photo of sks",
            "trigger_word": "sks", "seed": 0, "steps": 2, "guidance": 3.5, "sampler_name": "euler",
            "scheduler": "simple", "width": SIZE, "height": SIZE, "mode": "grid",
            "strengths": ", ".join(map(str, STRENGTHS))}},
        "6": {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["4", 0], "strength_model": 1.0,
                                                          "bypass": False}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        **core_sample("1", 10), **core_sample("6", 20),
    }
    ex, stub = harness.run_prompt(graph)
    assert ex.success, [m for m in stub.messages if m[0] in ("execution_error", "execution_interrupted")]
    out = lambda nid: ex.caches.outputs.get_local(nid).outputs[0][0]  # noqa: E731
    grid = out("5")
    assert grid.shape == (1, SIZE, SIZE * len(STRENGTHS), 3)  # 1 row (one CONDITIONING) × 3 strengths
    assert ex.history_result["outputs"]["5"]["images"]
    tiles = [grid[:, :, i * SIZE:(i + 1) * SIZE] for i in range(len(STRENGTHS))]
    base, with_lora = out("13"), out("23")
    assert base.shape == tiles[0].shape
    assert torch.equal(tiles[0], base), "strength 0 must be the base model's sample"
    assert torch.allclose(tiles[2], with_lora, atol=1e-5), float((tiles[2] - with_lora).abs().max())
    full = float((with_lora - base).abs().max())
    assert full > 0.05  # the LoRA visibly changes the image (~0.3 here) ...
    # ... and strength 0.5 lies between (~0.16 from either end here)
    assert 0.2 * full < float((tiles[1] - base).abs().max()) < 0.8 * full
    assert 0.2 * full < float((tiles[1] - with_lora).abs().max()) < 0.8 * full
