"""``flowtrain train``: a LoRA from the model files ComfyUI users have, or a diffusers folder.

Models come from (``models.find_files``):

* ``--model``: a BFL-layout ``.safetensors`` (FLUX.1 dev/schnell, FLUX.2 dev or Klein), a file name in
  ``<--comfyui-models>/diffusion_models``, or a diffusers FLUX.1 folder; left out, the name a
  Trainer node's ``config.json`` recorded (``model.file``), else the only FLUX file there;
* ``--clip-l`` / ``--t5`` (FLUX.1), ``--text-encoder`` (FLUX.2: Qwen3 for Klein, Mistral for dev), ``--vae``:
  paths or names in ``text_encoders``/``clip`` and ``vae``, chosen automatically when one fits;
* ``--tokenizers DIR``: tokenizer folders (never downloaded); a ComfyUI checkout holding the
  models folder is searched too (``models.text_files.TOKENIZER_PATHS``).

Before any model loads it prints the dataset summary (``data.overview``). With preview
prompts set it renders previews into ``<run>/previews`` and writes ``samples.png``: the
baseline previews (the base model) above the final ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("trainer_core")

DESCRIPTION = """Train a LoRA from FLUX model files as ComfyUI keeps them (FLUX.1 dev/schnell, FLUX.2 dev, Klein)
or from a diffusers FLUX.1 folder, on an image folder with .txt captions. Nothing is downloaded.

examples:
  flowtrain train --comfyui-models ~/ComfyUI/models --model flux1-dev.safetensors \\
      --clip-l clip_l.safetensors --t5 t5xxl_fp16.safetensors --vae ae.safetensors \\
      --data ./my_dog --trigger sks --class-word dog --name my_dog
  flowtrain train --config ComfyUI/output/flowtrain/my_dog/config.json --comfyui-models ~/ComfyUI/models

Files left out are chosen when exactly one file of the needed kind is in the folder. Tokenizers
come from the ComfyUI checkout that holds the models folder, or --tokenizers DIR. The dataset
summary is printed before any model loads; with preview prompts set (--set preview.prompts=[...])
previews and a before/after samples.png land in the run folder."""


def add_arguments(train) -> None:
    train.add_argument("--model", help="a FLUX .safetensors file (BFL layout, as in ComfyUI's models/diffusion_models), "
                                       "its name under --comfyui-models, or a diffusers FLUX.1 folder; default: the "
                                       "file a --config run recorded, else the only FLUX file in --comfyui-models")
    train.add_argument("--comfyui-models", type=Path, metavar="DIR",
                       help="ComfyUI's models folder: --model, --clip-l, --t5, --text-encoder and --vae are "
                            "looked up there by name (diffusion_models/, text_encoders/ or clip/, vae/)")
    train.add_argument("--clip-l", metavar="FILE", help="FLUX.1 CLIP-L text encoder file (clip_l.safetensors)")
    train.add_argument("--t5", metavar="FILE", help="FLUX.1 T5-XXL text encoder file (t5xxl_fp16 or fp8_e4m3fn_scaled)")
    train.add_argument("--text-encoder", metavar="FILE", help="FLUX.2 text encoder file (Qwen3 for Klein, Mistral for dev)")
    train.add_argument("--vae", metavar="FILE", help="VAE file (FLUX.1 ae.safetensors or the FLUX.2 VAE)")
    train.add_argument("--tokenizers", type=Path, action="append", default=[], metavar="DIR",
                       help="folder with tokenizer folders (clip_l/, t5xxl/, qwen3/) or a ComfyUI checkout "
                            "(repeatable); the checkout above --comfyui-models is searched too")
    train.add_argument("--text-encoder-8bit", default="auto", choices=["auto", "on", "off"],
                       help="text encoders from files in int8 (bitsandbytes): auto = on a CUDA GPU whose free memory "
                            "their weights would exceed")
    train.add_argument("--data", type=Path, help="image folder with same-name .txt captions "
                                                 "(default: data.path of --config)")


def model_record(config_path: Optional[Path]) -> dict:
    """The ``model`` section a Trainer node's run wrote into ``config.json`` ({} if none)."""
    if not config_path:
        return {}
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # make_config reports the unreadable file
    record = data.get("model") if isinstance(data, dict) and "config" in data else None
    return record if isinstance(record, dict) else {}


@dataclass
class Parts:
    model: Any
    codec: Any
    text: Any
    identity: str  # the base model's identity (resume refuses another)
    name: str  # its file name (LoRA metadata ``ss_sd_model_name``)
    plan: Any = None  # memory plan made before the encoders took device memory
    place: Callable[[], None] = lambda: None  # puts the transformer on the device (after the encoders)


def load_parts(args, config, device, record: dict) -> Parts:
    """The model, codec and text encoder. From single files the transformer stays in CPU
    memory while the VAE and text encoders fill the caches on the device; its memory plan is
    made first (the budget sees the device empty) and ``place`` moves it once they are freed
    (streamed blocks are placed by the plan itself)."""
    import torch

    from .data.augment import needs_live_encoding
    from .models.local import load_diffusers_flux_folder
    from .models.single_file import load_diffusion_model, load_vae
    from .models.text_files import load_text_encoder
    from .session import DTYPES

    dtype = DTYPES[config.train.precision]
    name = args.model or record.get("file") or config.model.file or None
    if name and Path(name).expanduser().is_dir():
        model, codec, text = load_diffusers_flux_folder(Path(name), dtype=dtype, device=device,
                                                        base_quantization=config.train.base_quantization)
        return Parts(model, codec, text, str(name), Path(name).name)
    from .models.find_files import find_model_files

    files = find_model_files(models=args.comfyui_models, model=name, clip_l=args.clip_l, t5=args.t5,
                             text_encoder=args.text_encoder, vae=args.vae, tokenizers=args.tokenizers)
    if config.train.base_quantization != "none":
        raise ValueError("train.base_quantization applies to diffusers folders only; a single file loads as stored "
                         "(fp8 files are dequantized to train.precision); set train.base_quantization=none")
    log.info("files: %s", files.summary())
    model = load_diffusion_model(files.model, dtype=dtype, device=torch.device("cpu"))
    model.device = device
    plan = model.plan_memory(config)  # refuses a run that cannot fit before the encoders load
    resident = device.type != "cpu" and not plan.streamed

    def place() -> None:
        if resident and next(model.module.parameters()).device != device:
            model.module.to(device)

    if needs_live_encoding(config.data.augment):  # the encoders stay loaded all run: no later moment
        place()
    codec = load_vae(files.vae, dtype=dtype, device=device, arch=files.arch)
    text = load_text_encoder(files.arch, files.text, files.tokenizers, dtype=dtype, device=device,
                             schnell=files.arch == "flux1" and not model.guidance_embed, int8=args.text_encoder_8bit)
    identity = f"file:{files.model.name}:{files.model.stat().st_size}"
    return Parts(model, codec, text, identity, files.model.name, plan, place)


def run(args, *, device, stop, make_config, progress, phases):
    """Train as ``args`` say; returns the ``TrainResult``."""
    from . import distributed
    from .data.overview import format_overview, overview
    from .demo.run import preview_callbacks, preview_prompts
    from .run_facts import resolved_precision
    from .session import check_before_loading, train_lora

    config = make_config(args, {})
    if not config.data.path:
        raise ValueError("no dataset: give --data FOLDER (or a --config with data.path)")
    check_before_loading(config)  # the data folder, captions and run folder: before the slow load
    config = config.replace(train=dataclasses.replace(
        config.train, precision=resolved_precision(config.train.precision, device)))
    if distributed.current().is_main:
        log.info("%s", format_overview(overview(config.data)))
    parts = load_parts(args, config, device, model_record(args.config))
    previews = preview_callbacks(config, parts.codec, parts.text)

    def release():
        parts.text.release()
        if not previews:  # previews decode with the VAE until the end
            parts.codec.release()
        parts.place()

    result = train_lora(config, parts.model, parts.codec, parts.text, release_encoders=release, progress=progress,
                        should_stop=stop, base_model=parts.identity, phase_progress=phases, model_name=parts.name,
                        callbacks=previews, prompts=preview_prompts(config), memory_plan=parts.plan)
    if previews and distributed.current().is_main:
        samples = write_samples(result.run_dir, result.steps)
        if samples:
            log.info("samples: %s", samples)
    return result


def write_samples(run_dir: Path, steps: int) -> Optional[Path]:
    """``samples.png``: the trigger previews of the base model (``previews/baseline``) above
    those after training (``previews/final``); None when either is missing."""
    from .data.images import image_to_tensor, load_image
    from .demo.grid import save_grid
    from .previews import PREVIEW_DIR

    rows = []
    for name in ("baseline", "final"):
        files = sorted((Path(run_dir) / PREVIEW_DIR / name).glob("p*_trigger.png"))
        if not files:
            return None
        import torch

        rows.append(torch.stack([image_to_tensor(load_image(p)) for p in files]))
    return save_grid(rows, Path(run_dir) / "samples.png", labels=["before training", f"after {steps} steps"])
