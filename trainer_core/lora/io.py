"""Reading and writing LoRA safetensors files, atomically, with kohya-style metadata.

Metadata is a flat str → str map (the safetensors header allows nothing else). Our own keys
are ``flowtrain.*`` (``flowtrain.format_version`` and the full config as JSON, so a file can
be re-read by later versions and its run reproduced); the ``ss_*`` and ``modelspec.*`` keys
are the ones kohya's sd-scripts (FLUX.1) and musubi-tuner (FLUX.2) write, which UIs and model
sites display (see ``lora/metadata.py``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import trainer_core
from trainer_core.config import TrainingConfig
from trainer_core.lora.metadata import RunInfo, run_keys
from trainer_core.models.families import FAMILIES

log = logging.getLogger(__name__)



def save_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` + ``metadata`` to ``path`` atomically: a temp file in the same folder,
    flushed and fsync'ed, then ``os.replace``. A failure leaves any old file untouched and no
    temp file behind."""
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"LoRA metadata values must be strings; not strings: {bad}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot save LoRA {path!r}: folder {folder!r} does not exist")
    data = st_save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata=metadata,
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    log.info("saved LoRA %s (%d tensors)", path, len(tensors))


def _fsync_dir(folder: str) -> None:
    """Make the rename durable; some filesystems refuse to open directories, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directory fsync is unsupported here; the data itself is already synced
    finally:
        os.close(fd)


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors LoRA file; metadata is {} when the file has none."""
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"LoRA file {path!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata


def build_metadata(
    config: TrainingConfig,
    *,
    arch: str,
    steps: int,
    trigger_word: str,
    base_model: str,
    resolution: int | None = None,
    run: RunInfo | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The metadata of a LoRA file after ``steps`` optimizer steps.

    ``base_model``: our identity of the base model (a fingerprint or a path; kept as
    ``flowtrain.base_model``); ``run``: the variant, model file name, start time and
    dataset facts (``lora.metadata.RunInfo``; without it the family's generic variant and
    empty dataset facts are written). ``resolution`` defaults to the largest configured
    bucket resolution; ``extra`` adds further string keys (they may not overwrite the
    standard ones). The ``sshs_*`` hashes are added by ``metadata.with_hashes`` when saving.
    """
    fam = FAMILIES.get(arch)  # an unknown arch raises, naming the known families
    res = resolution if resolution is not None else max(config.data.buckets.resolutions)
    md = {
        "flowtrain.format_version": str(trainer_core.FORMAT_VERSION),
        "flowtrain.config": config.to_json(),
        "flowtrain.arch": arch,
        "flowtrain.trigger_word": trigger_word,
        "flowtrain.steps": str(int(steps)),
        "flowtrain.base_model": base_model,
        "ss_network_dim": str(config.lora.rank),
        "ss_network_alpha": str(config.lora.alpha),
        "ss_network_dropout": str(config.lora.dropout),
        "ss_network_module": fam.network_module,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(config.train.steps),
        "ss_learning_rate": str(config.optim.lr),
        "ss_unet_lr": str(config.optim.lr),
        "ss_optimizer": config.optim.optimizer,
        "ss_lr_scheduler": config.optim.schedule,
        "ss_seed": str(config.train.seed),
        "ss_output_name": config.train.output_name,
        "modelspec.title": config.train.output_name,
    }
    md.update(run_keys(config, arch, steps, run, res))
    md.update(network_metadata(config.lora, arch))
    for k, v in (extra or {}).items():
        if k in md:
            raise ValueError(f"extra metadata key {k!r} would overwrite a standard key")
        md[k] = v
    return md


def network_metadata(lora, arch: str) -> dict[str, str]:
    """The keys that say which adapter algorithm a file holds, as LyCORIS under kohya writes
    them: plain LoRA keeps kohya's ``networks.lora_flux``; LoKr/LoHa/DoRA are
    ``ss_network_module = lycoris.kohya`` with ``ss_network_args`` a JSON object of string
    values (``algo``, LoKr's ``factor``/``decompose_both``/``full_matrix``, DoRA's
    ``dora_wd``/``wd_on_output``). ``lora.init_from`` adds ``ss_continued_from`` (file name)."""
    from trainer_core.lora.algorithms import ALGORITHMS

    md = {"flowtrain.algorithm": lora.algorithm}
    module = ALGORITHMS.get(lora.algorithm).network_module
    if module is not None:
        args = {"algo": "lora" if lora.algorithm == "dora" else lora.algorithm, "preset": "full",
                "dropout": str(lora.dropout)}
        if lora.algorithm == "lokr":
            args.update(factor=str(lora.lokr_factor), decompose_both=str(lora.lokr_decompose_both),
                        full_matrix=str(lora.lokr_full_matrix))
        if lora.algorithm == "dora":
            args.update(dora_wd="True", wd_on_output="True")
        md["ss_network_module"] = module
        md["ss_network_args"] = json.dumps(args)
    if lora.init_from:
        md["ss_continued_from"] = os.path.basename(lora.init_from)
    return md


def read_config(metadata: dict[str, str]) -> TrainingConfig:
    """The ``TrainingConfig`` stored in a file's metadata (raises if absent or newer)."""
    version = metadata.get("flowtrain.format_version")
    if version is None or "flowtrain.config" not in metadata:
        raise ValueError("this LoRA file has no flowtrain.config metadata (not written by FlowTrain)")
    if int(version) > trainer_core.FORMAT_VERSION:
        raise ValueError(
            f"LoRA file format_version {version} is newer than this FlowTrain ({trainer_core.FORMAT_VERSION}); update FlowTrain"
        )
    return TrainingConfig.from_dict(json.loads(metadata["flowtrain.config"]))
