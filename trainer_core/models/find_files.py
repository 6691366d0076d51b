"""Find a run's model files by their ComfyUI names (``--comfyui-models DIR``).

ComfyUI keeps diffusion models in ``models/diffusion_models`` (older installs ``models/unet``),
text encoders in ``models/text_encoders`` (or ``models/clip``) and VAEs in ``models/vae``.
A flag names a file (``--model flux1-dev.safetensors``); a path that exists is used as is.
A flag left out is chosen automatically when its folder holds exactly one file of the kind
the model needs (read from the tensor names, not the file name); otherwise the error lists
the candidates and the flag to choose with. Tokenizers come from ``--tokenizers`` or the
ComfyUI checkout that holds the models folder (``text_files.TOKENIZER_PATHS``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .single_file import FAMILY_FILES, describe_file, header
from .text_files import KIND_NAMES, file_text_kind

FOLDERS = {"model": ("diffusion_models", "unet"), "text": ("text_encoders", "clip"), "vae": ("vae",)}
SUFFIXES = (".safetensors", ".sft")  # the extensions ComfyUI lists for these folders
FLAGS = {"model": "--model", "clip_l": "--clip-l", "t5xxl": "--t5", "qwen3": "--text-encoder",
         "mistral3": "--text-encoder", "vae": "--vae"}


@dataclass
class ModelFiles:
    arch: str
    model: Path
    text: dict[str, Path] = field(default_factory=dict)  # kind → file
    vae: Optional[Path] = None
    tokenizers: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"model {self.model}"] + [f"{KIND_NAMES[k]} {p}" for k, p in self.text.items()]
        return ", ".join(parts + ([f"VAE {self.vae}"] if self.vae else []))


def _folders(models: Optional[Path], what: str) -> list[Path]:
    return [models / f for f in FOLDERS[what] if models is not None and (models / f).is_dir()]


def _candidates(models: Optional[Path], what: str, fits) -> list[Path]:
    out = []
    for folder in _folders(models, what):
        for p in sorted(q for q in folder.rglob("*") if q.suffix in SUFFIXES and q.is_file()):
            try:
                if fits(p):
                    out.append(p)
            except ValueError:  # unreadable file: not a candidate
                continue
    return out


def _pick(name: Optional[str], models: Optional[Path], what: str, kind: str, looks_for: str, fits) -> Path:
    where = _folders(models, what) or ([models / f for f in FOLDERS[what]] if models else [])
    if name:
        direct = Path(name).expanduser()
        path = direct if direct.exists() else next((f / name for f in where if (f / name).exists()), None)
        if path is not None:
            if path.is_file() and not fits(path):  # checked now, before any slow load
                raise ValueError(f"{FLAGS[kind]} {path} is {describe_file(path)}, not a {looks_for}")
            return path
        places = ", ".join(map(str, where)) if where else "nowhere (give --comfyui-models DIR or a path)"
        raise ValueError(f"{FLAGS[kind]} {name}: no such file; looked in the current folder and {places}")
    if models is None:
        raise ValueError(f"{FLAGS[kind]} is needed ({looks_for}): give a file path, or --comfyui-models DIR to find it "
                         "by its ComfyUI name")
    found = _candidates(models, what, fits)
    if len(found) == 1:
        return found[0]
    places = ", ".join(map(str, where)) or f"{models} (no {' or '.join(FOLDERS[what])} folder there)"
    if not found:
        raise ValueError(f"no {looks_for} found in {places}; put one there or give {FLAGS[kind]} PATH")
    raise ValueError(f"{len(found)} files could be the {looks_for} in {places}: "
                     f"{', '.join(p.name for p in found)}; choose one with {FLAGS[kind]} NAME")


def _is_flux(p: Path) -> bool:
    return "diffusion model" in describe_file(p) and "diffusers" not in describe_file(p)


def _vae_channels(p: Path) -> Optional[int]:
    h = header(p)
    key = next((k for k in h if k.endswith("decoder.conv_in.weight")), None)
    return h[key]["shape"][1] if key else None


def find_model_files(*, models: Optional[Path], model: Optional[str], clip_l: Optional[str] = None,
                     t5: Optional[str] = None, text_encoder: Optional[str] = None, vae: Optional[str] = None,
                     tokenizers: Optional[list[Path]] = None) -> ModelFiles:
    """Resolve every file a single-file FLUX run needs (see the module docstring)."""
    models = Path(models).expanduser() if models else None
    model_path = _pick(model, models, "model", "model", "FLUX diffusion model (BFL layout)", _is_flux)
    if model_path.is_dir():  # a diffusers folder: the caller loads it whole
        return ModelFiles(arch="flux1", model=model_path)
    looks = describe_file(model_path)
    if "diffusion model" not in looks or "diffusers" in looks:
        raise ValueError(f"--model {model_path} is {looks}, not a FLUX diffusion model; ComfyUI keeps those in "
                         "models/diffusion_models")
    arch = "flux2" if "FLUX.2" in looks else "flux1"
    z, kinds, _, _ = FAMILY_FILES[arch]
    files = ModelFiles(arch=arch, model=model_path)
    names = {"clip_l": clip_l, "t5xxl": t5}
    if arch == "flux1":
        wanted = ["clip_l", "t5xxl"]
    else:
        wanted = [_flux2_kind(text_encoder, models)]
        names[wanted[0]] = text_encoder
    for kind in wanted:
        path = _pick(names.get(kind), models, "text", kind, f"{KIND_NAMES[kind]} text encoder",
                     lambda p, k=kind: file_text_kind(p) == k)
        files.text[kind] = path
    family = {"flux1": "FLUX.1", "flux2": "FLUX.2"}[arch]
    files.vae = _pick(vae, models, "vae", "vae", f"{family} VAE ({z} latent channels)", lambda p: _vae_channels(p) == z)
    search = list(tokenizers or [])
    if models is not None and (models.parent / "comfy").is_dir():
        search.append(models.parent)  # the ComfyUI checkout that holds models/
    files.tokenizers = search
    return files


def _flux2_kind(text_encoder: Optional[str], models: Optional[Path]) -> str:
    """Which FLUX.2 encoder: the given file's kind, else the only Qwen3/Mistral file present."""
    if text_encoder:
        path = Path(text_encoder).expanduser()
        if not path.exists():
            path = next((f / text_encoder for f in _folders(models, "text") if (f / text_encoder).exists()), path)
        if path.exists():
            kind = file_text_kind(path)
            if kind in FAMILY_FILES["flux2"][1]:
                return kind
            raise ValueError(f"--text-encoder {path} is {describe_file(path)}, not FLUX.2's Qwen3 (Klein) or "
                             "Mistral (dev) text encoder")
        return "qwen3"  # _pick reports the missing file
    present = {k for k in FAMILY_FILES["flux2"][1] if _candidates(models, "text", lambda p, k=k: file_text_kind(p) == k)}
    if present == {"qwen3", "mistral3"}:
        raise ValueError("both a Qwen3 (Klein) and a Mistral (FLUX.2-dev) text encoder are in the text encoder "
                         "folders; choose the one of this model with --text-encoder NAME")
    return "mistral3" if present == {"mistral3"} else "qwen3"
