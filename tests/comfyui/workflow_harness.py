"""Helpers for running FlowTrain's example workflows in a real, in-process ComfyUI.

``comfy_env(root)`` imports ComfyUI (``COMFYUI_PATH``) once per process with FlowTrain and
the test-only pack (``test_pack/``) as custom nodes and the model/input/output/lora folders
under ``root``; ``load_api_workflow`` + ``use_test_conditioning`` + ``shrink`` turn an
example's API graph into a seconds-long CPU run on tiny models.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PACK_NAME = "flowtrain"
_ENV: dict = {}


@dataclass
class ComfyEnv:
    root: Path
    models: Path
    loras: Path
    input: Path
    output: Path
    stub: object

    @property
    def pack(self):
        """The FlowTrain package as ComfyUI imported it (its ``nodes`` subpackage etc.)."""
        for name, module in sys.modules.items():
            if name.endswith(".nodes.specs") or name == f"{PACK_NAME}.nodes.specs":
                if Path(module.__file__).resolve() == (ROOT / "nodes" / "specs.py").resolve():
                    return sys.modules[name.rsplit(".nodes.specs", 1)[0]]
        raise RuntimeError("FlowTrain was not loaded by ComfyUI")


def comfy_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and (Path(path) / "comfy" / "model_base.py").is_file() else None


def comfy_env(root: Path) -> ComfyEnv:
    """Import ComfyUI with FlowTrain + the test pack loaded (once per process)."""
    if "env" in _ENV:
        return _ENV["env"]
    from harness import init_comfyui  # tests/comfyui/harness.py (on sys.path via conftest/rootdir)

    init_comfyui(comfy_path())
    import folder_paths

    packs = root / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, ROOT), ("flowtrain_test_pack", HERE / "test_pack")):
        link = packs / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    env = ComfyEnv(root=root, models=root / "models", loras=root / "loras", input=root / "input",
                   output=root / "output", stub=None)
    for p in (env.models, env.loras, env.input, env.output):
        p.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("custom_nodes", str(packs), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", str(env.models), is_default=True)
    folder_paths.add_model_folder_path("vae", str(env.models), is_default=True)
    folder_paths.add_model_folder_path("loras", str(env.loras), is_default=True)
    folder_paths.set_input_directory(str(env.input))
    folder_paths.set_temp_directory(str(root / "temp"))  # not the ComfyUI checkout's temp/ (Sampler Preview's prompt cache)
    env.stub = init_comfyui(comfy_path(), load_nodes=True, output_dir=str(env.output))
    import nodes

    missing = [n for n in ("FlowTrainTrainer", "FlowTrainTestConditioning") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"ComfyUI did not load {missing}; see the log for the import error")
    _ENV["env"] = env
    return env


def write_dataset(folder: Path, n: int = 3, size: int = 64, trigger: str = "sks") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{trigger}, picture {i}", encoding="utf-8")
    return folder


def load_api_workflow(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [nid for nid, node in graph.items() if node["class_type"] == class_type]


def use_test_conditioning(graph: dict, *, width: int, pooled: int) -> dict:
    """Replace the text encoders by ``FlowTrainTestConditioning``: CLIP loaders go, the
    Trainer and Sampler preview take CONDITIONING, CLIPTextEncode nodes become test nodes."""
    g = json.loads(json.dumps(graph))
    clip_ids = {nid for nid, n in g.items() if n["class_type"] in ("DualCLIPLoader", "CLIPLoader")}
    for nid in clip_ids:
        del g[nid]
    g["900"] = {"class_type": "FlowTrainTestConditioning",
                "inputs": {"width": width, "length": 7, "pooled_width": pooled, "seed": 1}}
    for nid, node in list(g.items()):
        inputs = node["inputs"]
        if node["class_type"] == "CLIPTextEncode":
            g[nid] = {"class_type": "FlowTrainTestConditioning",
                      "inputs": {"width": width, "length": 5, "pooled_width": pooled, "seed": int(nid)}}
        elif isinstance(inputs.get("clip"), list) and inputs["clip"][0] in clip_ids:
            del inputs["clip"]
            key = "conditioning" if node["class_type"] == "FlowTrainTrainer" else "positive"
            inputs[key] = ["900", 0]
    return g


def shrink(graph: dict, *, unet: str, vae: str, dataset: Path, output_name: str, steps: int = 3,
           preview_every: int = 2) -> dict:
    """Tiny sizes and few steps everywhere."""
    g = json.loads(json.dumps(graph))
    for node in g.values():
        i, t = node["inputs"], node["class_type"]
        if t == "UNETLoader":
            i["unet_name"] = unet
        elif t == "VAELoader":
            i["vae_name"] = vae
        elif t == "FlowTrainDataset":
            i["folder"] = str(dataset)
        elif t == "FlowTrainBucketer":
            i.update(resolutions="64", step=16, min_side=32)
        elif t == "FlowTrainLoraConfig":
            i.update(rank=4, alpha=4.0, targets="all")
        elif t == "FlowTrainTrainer":
            i.update(steps=steps, learning_rate=2e-3, output_name=output_name, save_every=0)
        elif t == "FlowTrainPreviewSettings":
            i.update(every_n_steps=preview_every, steps=2, width=64, height=64)
        elif t == "FlowTrainSaveLora":
            i["name"] = output_name
        elif t in ("FlowTrainSamplerPreview", "KSampler"):
            i["steps"] = 2
            if t == "FlowTrainSamplerPreview":
                i.update(width=64, height=64)
        elif t in ("EmptySD3LatentImage", "EmptyFlux2LatentImage"):
            i.update(width=64, height=64)
    return g
