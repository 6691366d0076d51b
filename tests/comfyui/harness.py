"""Real ComfyUI in this process, for tests and benchmarks (no HTTP server).

* ``init_comfyui(path)``: import ComfyUI from ``path`` on CPU, once per process. ComfyUI's
  ``comfy.model_management`` reads the ``--cpu`` flag at import time, so this must run
  before anything imports ``comfy``. ``load_nodes=True`` also imports the built-in and
  custom nodes (~8 s) and installs a stub ``PromptServer`` so prompts run in-process.
* ``flux_state_dict`` / ``write_tiny_flux``: tiny random FLUX.1 (dev/schnell) and FLUX.2
  diffusion-model files in the BFL layout that ComfyUI's model detection reads
  (``comfy/model_detection.py``: hidden size from ``img_in``, FLUX.2 from
  ``double_stream_modulation_img``, dev from ``guidance_in``). Hidden size must be a
  multiple of 128 (ComfyUI fixes the head dim at 128).
* ``quantize_state_dict`` / ``write_tiny_flux_quantized``: the same files in ComfyUI's
  ``comfy_quant`` fp8-scaled format, made with ComfyUI's own quantization code
  (``QuantizedTensor.from_float(W, "TensorCoreFP8E4M3Layout", scale="recalculate")``): the
  block linears hold fp8 weights plus a ``weight_scale``, marked per layer (``.comfy_quant``
  tensors) or in the ``_quantization_metadata`` header.
* ``vae_state_dict`` / ``write_tiny_vae``: a random FLUX.1/FLUX.2 VAE that ``VAELoader``
  accepts (ComfyUI fixes the encoder at width 128, so only the decoder is small).
* ``load_flux(path, ...)``: ``comfy.sd.load_diffusion_model`` under ``torch.inference_mode``,
  as UNETLoader does inside a prompt, so the weights are inference tensors.
* ``StubServer`` / ``run_prompt``: execute an API-format prompt in-process.

Only torch and safetensors are imported at module level; ComfyUI is imported lazily.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tiny_zimage import write_tiny_zimage, zimage_detection

log = logging.getLogger(__name__)

HEAD_DIM = 128  # ComfyUI derives num_heads = hidden // 128 for FLUX files
_STATE: dict = {}


# ---------------------------------------------------------------------- ComfyUI import
BRIDGE_MODULE = "flowtrain_bridge"


def load_bridge():
    """The pack's ``nodes/bridge`` package loaded by path (after ``init_comfyui``): inside the
    tests the name ``nodes`` is ComfyUI's own module, so the pack cannot be imported by name."""
    if BRIDGE_MODULE not in sys.modules:
        import importlib.util

        folder = Path(__file__).resolve().parents[2] / "nodes" / "bridge"
        spec = importlib.util.spec_from_file_location(BRIDGE_MODULE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[BRIDGE_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[BRIDGE_MODULE]


def bridge_config(checkpointing="blocks", precision: str = "auto", **sections):
    """A ``TrainingConfig`` for ``bridge.training_model(mp, config)``: ``checkpointing`` (a
    mode, or a bool: True = "blocks"), ``precision`` and whole config sections (``memory=...``)."""
    from trainer_core.config import TrainConfig, TrainingConfig

    if isinstance(checkpointing, bool):
        checkpointing = "blocks" if checkpointing else "off"
    return TrainingConfig(train=TrainConfig(gradient_checkpointing=checkpointing, precision=precision), **sections)


def _apply_torchvision_shim() -> None:
    """On machines whose torchvision is a CUDA build over CPU torch, the dev venv ships a
    shim module (``comfyui_tv_shim``) that defines the missing operator schemas. Optional."""
    try:
        import comfyui_tv_shim  # type: ignore
    except ImportError:
        log.debug("no comfyui_tv_shim in this environment; assuming torchvision imports cleanly")
        return
    comfyui_tv_shim.install()


def init_comfyui(comfy_path: str | os.PathLike, *, load_nodes: bool = False, output_dir: str | None = None):
    """Import ComfyUI from ``comfy_path`` in CPU mode; idempotent. Returns the stub server
    when ``load_nodes`` (else None until nodes are loaded)."""
    comfy_path = str(Path(comfy_path).resolve())
    if not _STATE.get("imported"):
        if not (Path(comfy_path) / "comfy" / "model_base.py").is_file():
            raise ValueError(f"COMFYUI_PATH={comfy_path} is not a ComfyUI checkout (no comfy/model_base.py)")
        _apply_torchvision_shim()
        if comfy_path not in sys.path:
            sys.path.insert(0, comfy_path)
        if "comfy.model_management" in sys.modules:
            raise RuntimeError("comfy.model_management was imported before init_comfyui(); it would not be in CPU mode")
        from comfy.cli_args import args

        args.cpu = True
        args.database_url = "sqlite:///:memory:"
        import comfy.model_management  # noqa: F401  (device setup reads args.cpu here)

        _STATE["imported"] = True
    if output_dir:
        import folder_paths

        folder_paths.set_output_directory(os.path.abspath(output_dir))
    if load_nodes and not _STATE.get("nodes"):
        import nodes
        import server

        stub = StubServer()
        server.PromptServer.instance = stub
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if failed:
            log.warning("ComfyUI extras that failed to import: %s", failed)
        _STATE["nodes"] = stub
    return _STATE.get("nodes")


class StubServer:
    """The parts of ``server.PromptServer`` that the executor and V3 nodes use."""

    def __init__(self):
        from app.node_replace_manager import NodeReplaceManager

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.node_replace_manager = NodeReplaceManager()
        self.messages: list = []
        self.progress_text: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.progress_text.append((str(node_id), text))


def stub_model(name: str):
    """A stand-in MODEL for ``bridge.detect_arch``: its ``.model`` is an uninitialised
    ``comfy.model_base.<name>`` whose ``model_config`` is an uninitialised
    ``comfy.supported_models.<name>`` (what a loaded model of that kind carries)."""
    import types

    import comfy.model_base
    import comfy.supported_models

    model = object.__new__(getattr(comfy.model_base, name))
    model.model_config = object.__new__(getattr(comfy.supported_models, name))
    return types.SimpleNamespace(model=model)


def run_prompt(prompt: dict, client_id: str = "tests"):
    """Validate and execute an API-format prompt; returns ``(executor, stub)``.
    ``executor.success`` and ``executor.caches.outputs.get_local(node).outputs`` hold the result."""
    import execution

    stub = _STATE.get("nodes")
    if stub is None:
        raise RuntimeError("call init_comfyui(..., load_nodes=True) first")
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not valid[0]:
        raise ValueError(f"prompt failed validation: {valid[1]} {valid[3]}")
    ex = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    stub.messages.clear()
    ex.execute(prompt, pid, {"client_id": client_id}, valid[2])
    return ex, stub


# ---------------------------------------------------------------------- tiny FLUX files
def _linear(sd: dict, name: str, out_f: int, in_f: int, bias: bool, g: torch.Generator, std: float) -> None:
    sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * std
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * std


FLUX2_MOD_STD = 0.055
"""Init std of a tiny FLUX.2's embedders and modulation layers. FLUX.2 has no biases, so its
blocks' gates come only from the timestep vector through two bias-free layers: at std 0.02
they are ~0.003 (FLUX.1's, carried by its biases, ~0.015), and with FLUX.2's larger output and
the 512-token text padding a LoRA moved the output ~40× less than FLUX.1's (relative output
change under one random rank-4 perturbation of the attention layers: FLUX.1 8.7e-4, FLUX.2-dev
2.4e-5, Klein 1.9e-5). At 0.055: FLUX.2-dev 1.9e-3, Klein 8.2e-4
(``test_families_learn.test_lora_sensitivity_matches_flux1``)."""
MODULATION_PATH = re.compile(r"(time_in|guidance_in|double_stream_modulation_img|double_stream_modulation_txt"
                             r"|single_stream_modulation|final_layer\.adaLN_modulation)\.")


def flux_state_dict(arch: str = "flux1", *, guidance: bool = True, hidden: int = 128, depth: int = 1,
                    depth_single: int = 1, context_dim: int = 64, vec_dim: int = 32, seed: int = 0,
                    std: float = 0.02, dtype: torch.dtype = torch.float32,
                    mod_std: float | None = None) -> dict[str, torch.Tensor]:
    """Every weight of ComfyUI's ``comfy.ldm.flux.model.Flux`` for a FLUX layout, BFL names.

    ``flux1``: patch 2, 16 latent channels (img_in 64 wide), MLP 4·H GELU, biases, per-block
    modulation, ``vector_in`` for the pooled CLIP vector. ``flux2``: patch 1, 128 channels,
    gated-SiLU MLP (first linear 2·3·H wide), no biases, global modulation, no ``vector_in``.
    Weights N(0, std²); RMSNorm scales 1; the timestep/guidance embedders and the modulation
    layers (``MODULATION_PATH``) N(0, mod_std²), by default std for FLUX.1 and
    ``FLUX2_MOD_STD`` for FLUX.2 (see there).
    """
    if hidden % HEAD_DIM:
        raise ValueError(f"hidden={hidden} must be a multiple of {HEAD_DIM} (ComfyUI fixes the FLUX head dim)")
    if arch not in ("flux1", "flux2"):
        raise ValueError(f"arch={arch!r}; expected 'flux1' or 'flux2'")
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    h = hidden
    v1 = arch == "flux1"
    bias, in_ch, mlp, mlp_first = (True, 64, 4 * h, 4 * h) if v1 else (False, 128, 3 * h, 6 * h)
    _linear(sd, "img_in", h, in_ch, bias, g, std)
    _linear(sd, "time_in.in_layer", h, 256, bias, g, std)
    _linear(sd, "time_in.out_layer", h, h, bias, g, std)
    if guidance:
        _linear(sd, "guidance_in.in_layer", h, 256, bias, g, std)
        _linear(sd, "guidance_in.out_layer", h, h, bias, g, std)
    if v1:
        _linear(sd, "vector_in.in_layer", h, vec_dim, True, g, std)
        _linear(sd, "vector_in.out_layer", h, h, True, g, std)
    _linear(sd, "txt_in", h, context_dim, bias, g, std)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            if v1:
                _linear(sd, f"{p}.{s}_mod.lin", 6 * h, h, True, g, std)
            _linear(sd, f"{p}.{s}_attn.qkv", 3 * h, h, bias, g, std)
            sd[f"{p}.{s}_attn.norm.query_norm.scale"] = torch.ones(HEAD_DIM)
            sd[f"{p}.{s}_attn.norm.key_norm.scale"] = torch.ones(HEAD_DIM)
            _linear(sd, f"{p}.{s}_attn.proj", h, h, bias, g, std)
            _linear(sd, f"{p}.{s}_mlp.0", mlp_first, h, bias, g, std)
            _linear(sd, f"{p}.{s}_mlp.2", h, mlp, bias, g, std)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        _linear(sd, f"{p}.linear1", 3 * h + mlp_first, h, bias, g, std)
        _linear(sd, f"{p}.linear2", h, h + mlp, bias, g, std)
        sd[f"{p}.norm.query_norm.scale"] = torch.ones(HEAD_DIM)
        sd[f"{p}.norm.key_norm.scale"] = torch.ones(HEAD_DIM)
        if v1:
            _linear(sd, f"{p}.modulation.lin", 3 * h, h, True, g, std)
    _linear(sd, "final_layer.linear", in_ch, h, bias, g, std)
    _linear(sd, "final_layer.adaLN_modulation.1", 2 * h, h, bias, g, std)
    if not v1:
        _linear(sd, "double_stream_modulation_img.lin", 6 * h, h, False, g, std)
        _linear(sd, "double_stream_modulation_txt.lin", 6 * h, h, False, g, std)
        _linear(sd, "single_stream_modulation.lin", 3 * h, h, False, g, std)
    mod_std = mod_std if mod_std is not None else (std if v1 else FLUX2_MOD_STD)
    if mod_std != std:
        g2 = torch.Generator().manual_seed(seed + 7)
        for k in list(sd):
            if MODULATION_PATH.match(k):
                sd[k] = torch.randn(sd[k].shape, generator=g2) * mod_std
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_flux(path: str | os.PathLike, arch: str = "flux1", **kw) -> Path:
    """Write ``flux_state_dict(arch, **kw)`` to ``path`` (safetensors); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flux_state_dict(arch, **kw), str(path), metadata={"format": "pt", "note": "random FLUX for tests"})
    return path


CHROMA_DROPPED = re.compile(r".*(_mod\.lin|modulation\.lin|adaLN_modulation\.1)\.(weight|bias)|(time_in|vector_in|guidance_in)\..*")
"""FLUX.1 keys Chroma does not have: its modulation comes from ``distilled_guidance_layer``."""


def chroma_state_dict(*, approximator_hidden: int = 64, approximator_layers: int = 2, seed: int = 0,
                      std: float = 0.02, dtype: torch.dtype = torch.float32, **kw) -> dict[str, torch.Tensor]:
    """Every weight of ComfyUI's ``comfy.ldm.chroma.model.Chroma``: the FLUX.1 blocks (qkv
    biases, GELU MLP, no per-block modulation), no ``time_in``/``vector_in``/``guidance_in``,
    a final layer without adaLN, and the modulation network ``distilled_guidance_layer``
    (``in_proj`` 64 → A, ``layers.i.in_layer/out_layer`` A → A, RMSNorm ``norms.i.scale``,
    ``out_proj`` A → hidden). ``kw`` as ``flux_state_dict`` (hidden, depth, context_dim...).
    Load the file with ``load_model`` (ComfyUI fixes the approximator widths, see
    ``chroma_detection``)."""
    sd = {k: v for k, v in flux_state_dict("flux1", guidance=False, seed=seed, std=std, **kw).items()
          if not CHROMA_DROPPED.fullmatch(k)}
    h = sd["img_in.weight"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    a, p = approximator_hidden, "distilled_guidance_layer"
    _linear(sd, f"{p}.in_proj", a, 64, True, g, std)
    for i in range(approximator_layers):
        _linear(sd, f"{p}.layers.{i}.in_layer", a, a, True, g, std)
        _linear(sd, f"{p}.layers.{i}.out_layer", a, a, True, g, std)
        sd[f"{p}.norms.{i}.scale"] = torch.ones(a)
    _linear(sd, f"{p}.out_proj", h, a, True, g, std)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_chroma(path: str | os.PathLike, **kw) -> Path:
    """Write ``chroma_state_dict(**kw)`` to ``path`` (safetensors); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(chroma_state_dict(**kw), str(path), metadata={"format": "pt", "note": "random Chroma for tests"})
    return path


@contextlib.contextmanager
def chroma_detection():
    """ComfyUI's model detection, with the Chroma approximator's widths read from the file.

    ``comfy.model_detection`` recognises Chroma by its ``distilled_guidance_layer`` keys but
    then fixes the approximator to the released model's sizes (in 64, hidden 5120, 5 layers,
    out 3072 = the model width), so any smaller Chroma fails to load. Inside this block the
    detected config keeps everything ComfyUI decided and takes ``hidden_dim``, ``out_dim`` and
    ``n_layers`` from the weights (identical for a released file)."""
    import comfy.model_detection as md

    original = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        config = original(state_dict, key_prefix, metadata=metadata)
        if config is not None and config.get("image_model") == "chroma":
            p = f"{key_prefix}distilled_guidance_layer."
            config["hidden_dim"] = int(state_dict[f"{p}in_proj.weight"].shape[0])
            config["out_dim"] = int(state_dict[f"{p}out_proj.weight"].shape[0])
            config["n_layers"] = md.count_blocks(list(state_dict.keys()), f"{p}layers." + "{}.")
        return config

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = original


@dataclass(frozen=True)
class TinyModel:
    """A tiny model file of one family: ``write(path)`` writes it (safetensors, real key names)
    so that ComfyUI's own model detection recognises the family; returns the path."""

    family: str  # a trainer_core.models.families name
    write: Callable[[Path], Path]


TINY_MODELS: dict[str, TinyModel] = {
    "flux1-dev": TinyModel("flux1", functools.partial(write_tiny_flux, arch="flux1", guidance=True)),
    "flux1-schnell": TinyModel("flux1", functools.partial(write_tiny_flux, arch="flux1", guidance=False)),
    "flux2-dev": TinyModel("flux2", functools.partial(write_tiny_flux, arch="flux2", guidance=True)),
    "klein": TinyModel("flux2", functools.partial(write_tiny_flux, arch="flux2", guidance=False)),
    "chroma": TinyModel("chroma", write_tiny_chroma),
    "zimage": TinyModel("zimage", write_tiny_zimage),  # loads under zimage_detection (load_flux does)
}
"""One entry per tiny test model; every registered family needs at least one (a new family
adds its builder here, and ``test_families_learn`` trains it automatically)."""


QUANT_LAYER = r"(double|single)_blocks\.\d+\..*"
"""Which linears ``quantize_state_dict`` quantizes: the transformer blocks' (as ComfyUI's
fp8-scaled FLUX releases do; embedders and the final layer stay in full precision)."""


def quantize_state_dict(sd: dict[str, torch.Tensor], *, marker: str = "layer") -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of ``sd`` with every 2-D block weight in ComfyUI's
    float8_e4m3fn ``comfy_quant`` format. ``marker``: "layer" writes ``<layer>.comfy_quant``
    (UTF-8 JSON bytes), "header" the ``_quantization_metadata`` header entry instead."""
    import json
    import re

    from comfy.quant_ops import QuantizedTensor

    if marker not in ("layer", "header"):
        raise ValueError(f"marker={marker!r}; expected 'layer' or 'header'")
    out, layers = {}, {}
    for key, value in sd.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and value.ndim == 2 and re.fullmatch(QUANT_LAYER, layer):
            q = QuantizedTensor.from_float(value.to(torch.bfloat16), "TensorCoreFP8E4M3Layout", scale="recalculate")
            out.update({k: v.contiguous() for k, v in q.state_dict(key).items()})
            layers[layer] = {"format": "float8_e4m3fn"}
            if marker == "layer":
                conf = json.dumps(layers[layer]).encode("utf-8")
                out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[key] = value
    metadata = {"format": "pt"}
    if marker == "header":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata


def write_tiny_flux_quantized(path: str | os.PathLike, arch: str = "flux1", *, marker: str = "layer", **kw) -> Path:
    """``flux_state_dict(arch, dtype=bf16, **kw)`` through ``quantize_state_dict`` to ``path``.
    Needs ComfyUI imported (``init_comfyui``) with comfy_kitchen available."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw.setdefault("dtype", torch.bfloat16)
    tensors, metadata = quantize_state_dict(flux_state_dict(arch, **kw), marker=marker)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _conv(sd, name, out_c, in_c, k, g, std):
    sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) * std
    sd[f"{name}.bias"] = torch.zeros(out_c)


def _norm(sd, name, c):
    sd[f"{name}.weight"] = torch.ones(c)
    sd[f"{name}.bias"] = torch.zeros(c)


def _resnet(sd, p, cin, cout, g, std):
    _norm(sd, f"{p}.norm1", cin)
    _conv(sd, f"{p}.conv1", cout, cin, 3, g, std)
    _norm(sd, f"{p}.norm2", cout)
    _conv(sd, f"{p}.conv2", cout, cout, 3, g, std)
    if cin != cout:
        _conv(sd, f"{p}.nin_shortcut", cout, cin, 1, g, std)


def _attn(sd, p, c, g, std):
    _norm(sd, f"{p}.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{p}.{n}", c, c, 1, g, std)


def vae_state_dict(arch: str = "flux1", *, dec_ch: int = 32, enc_ch: int = 128, seed: int = 0, std: float = 0.02,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A FLUX ``ae`` (ldm AutoencoderKL layout): encoder of width ``enc_ch`` (ComfyUI fixes it
    at 128; the engine's loader reads any width), ch_mult (1, 2, 4, 4), 2 res blocks; a decoder
    of width ``dec_ch``. ``flux2`` adds quant convs and the batch-norm latent statistics
    (z 32 → 128 channels at /16)."""
    z = 16 if arch == "flux1" else 32
    mult, nres = (1, 2, 4, 4), 2
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "encoder.conv_in", enc_ch, 3, 3, g, std)
    block_in = enc_ch
    for i, m in enumerate(mult):
        block_in, block_out = enc_ch * ((1,) + mult)[i], enc_ch * m
        for j in range(nres):
            _resnet(sd, f"encoder.down.{i}.block.{j}", block_in, block_out, g, std)
            block_in = block_out
        if i != len(mult) - 1:
            _conv(sd, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3, g, std)
    _resnet(sd, "encoder.mid.block_1", block_in, block_in, g, std)
    _attn(sd, "encoder.mid.attn_1", block_in, g, std)
    _resnet(sd, "encoder.mid.block_2", block_in, block_in, g, std)
    _norm(sd, "encoder.norm_out", block_in)
    _conv(sd, "encoder.conv_out", 2 * z, block_in, 3, g, std)
    block_in = dec_ch * mult[-1]
    _conv(sd, "decoder.conv_in", block_in, z, 3, g, std)
    _resnet(sd, "decoder.mid.block_1", block_in, block_in, g, std)
    _attn(sd, "decoder.mid.attn_1", block_in, g, std)
    _resnet(sd, "decoder.mid.block_2", block_in, block_in, g, std)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            _resnet(sd, f"decoder.up.{i}.block.{j}", block_in, dec_ch * mult[i], g, std)
            block_in = dec_ch * mult[i]
        if i != 0:
            _conv(sd, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3, g, std)
    _norm(sd, "decoder.norm_out", block_in)
    _conv(sd, "decoder.conv_out", 3, block_in, 3, g, std)
    if arch == "flux2":
        sd["quant_conv.weight"] = torch.eye(2 * z).reshape(2 * z, 2 * z, 1, 1)
        sd["quant_conv.bias"] = torch.zeros(2 * z)
        sd["post_quant_conv.weight"] = torch.eye(z).reshape(z, z, 1, 1)
        sd["post_quant_conv.bias"] = torch.zeros(z)
        sd["bn.running_mean"] = torch.zeros(4 * z)
        sd["bn.running_var"] = torch.ones(4 * z)
        sd["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_tiny_vae(path: str | os.PathLike, arch: str = "flux1", **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae_state_dict(arch, **kw), str(path))
    return path


# ---------------------------------------------------------------------- loading
def load_flux(path: str | os.PathLike, *, dtype: torch.dtype | None = None, inference: bool = True):
    """A ComfyUI ``ModelPatcher`` for a diffusion-model file, loaded like UNETLoader.

    ``dtype`` goes to ``model_options["dtype"]`` (e.g. ``torch.float8_e4m3fn`` is what
    UNETLoader's ``weight_dtype=fp8_e4m3fn`` does). ``inference=True`` loads inside
    ``torch.inference_mode()`` as every node does, so the weights are inference tensors.
    Tiny Z-Image files load too (``tiny_zimage.zimage_detection``)."""
    import comfy.sd

    options = {} if dtype is None else {"dtype": dtype}
    with chroma_detection(), zimage_detection(), torch.inference_mode(inference):  # any TINY_MODELS family
        return comfy.sd.load_diffusion_model(str(path), model_options=options)


def load_vae(path: str | os.PathLike):
    """A ComfyUI ``VAE`` from a file, loaded like VAELoader (inside inference mode)."""
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)
        vae.throw_exception_if_invalid()
    return vae
