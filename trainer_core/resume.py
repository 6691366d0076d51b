"""Resume planning: which checkpoint a run continues from, and whether the config changed in
a way the saved state still fits (``checkpoint.py`` writes and reads the checkpoints)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from .checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)

HELD_OUT = "validation.held_out"  # derived: which images data/holdout.py keeps out of training

# Changing one of these makes the saved state meaningless for the new config: refused.
UNSAFE_FIELDS = ("lora.rank", "lora.alpha", "lora.targets", "lora.target_regex", "lora.dtype", "data.path",
                 "data.batch_size", "train.seed", "optim.grad_accum", "optim.optimizer",
                 "optim.loraplus_lr_ratio", "ema.enabled", HELD_OUT, "lora.algorithm", "lora.lokr_factor",
                 "lora.lokr_decompose_both", "lora.lokr_full_matrix", "lora.init_from")
# Changing one of these does not change what is trained: accepted and logged.
SAFE_FIELDS = ("train.steps", "train.save_every", "train.log_every", "train.keep_checkpoints",
               "train.existing_run", "train.resume_from", "train.output_dir", "train.output_name",
               "data.cache_dir", "data.strict", "preview.", "validation.", "memory.", "model.")


def _dotted(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_dotted(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(old: dict, new: dict, old_model: dict, new_model: dict) -> tuple[list[str], list[str], list[str]]:
    """(unsafe, safe, other) changes as ``"field: old -> new"``; ``*_model`` are
    ``{"arch", "base_model"}`` of the checkpoint's model and the current one."""
    a, b = _dotted(old), _dotted(new)
    for d in (a, b):
        if d.get("data.path"):
            d["data.path"] = str(Path(d["data.path"]).expanduser().resolve())
        d[HELD_OUT] = _held_out(d)
    unsafe, safe, other = [], [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        if key in UNSAFE_FIELDS:
            unsafe.append(line)
        elif any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_FIELDS):
            safe.append(line)
        else:
            other.append(line)
    for key in ("arch", "base_model"):
        x, y = old_model.get(key, ""), new_model.get(key, "")
        if x and y and x != y:
            unsafe.append(f"model {key}: {x!r} -> {y!r}")
    return unsafe, safe, other


def _held_out(d: dict[str, Any]) -> str:
    """The validation split's effect on training: other ``validation.*`` changes are safe,
    but holding out other images changes the training set."""
    if not d.get("validation.every_n_steps") or d.get("validation.path"):
        return "none"
    return f"{d.get('validation.images')} image(s), seed {d.get('validation.seed')}"


def _has_run(run_dir: Path) -> list[str]:
    found = [p.name for _, p in list_checkpoints(run_dir)]
    found += [n for n in ("lora_final.safetensors", "config.json") if (run_dir / n).exists()]
    return found


def find_resume_point(run_dir: Path, config: Any, model_info: dict) -> Optional[Checkpoint]:
    """The checkpoint this run continues from (``train.resume_from`` or the run folder's
    newest complete one), or None for a fresh start. Raises ValueError when the run folder
    holds a run and ``train.existing_run='refuse'``, or when the config changed in a way
    that makes resuming unsafe (the message names the fields)."""
    run_dir = Path(run_dir)
    t = config.train
    existing = _has_run(run_dir)
    if existing and t.existing_run == "refuse":
        raise ValueError(f"run folder {run_dir} already holds a run ({', '.join(existing[:4])}); "
                         "train.existing_run='refuse' never overwrites it: choose another train.output_name, "
                         "or set train.existing_run='resume' to continue it")
    if t.resume_from:
        folder = Path(t.resume_from).expanduser()
        if not folder.is_absolute() and not folder.exists():
            folder = run_dir / folder
        ckpt = load_checkpoint(folder)
    else:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            return None
        ckpt = load_checkpoint(latest)
    unsafe, safe, other = config_changes(ckpt.doc["config"], config.to_dict(), ckpt.doc.get("model", {}), model_info)
    if unsafe:
        raise ValueError(f"cannot resume {ckpt.folder}: these settings changed and the saved state does not fit "
                         "them:\n  " + "\n  ".join(unsafe) + "\nrestore them, or choose another train.output_name "
                         "to start a new run")
    if safe:
        log.info("resuming %s with changed settings: %s", ckpt.folder, "; ".join(safe))
    if other:
        log.warning("resuming %s with changed training settings (the result will differ from an uninterrupted "
                    "run): %s", ckpt.folder, "; ".join(other))
    if ckpt.step > t.steps:
        raise ValueError(f"{ckpt.folder} is at step {ckpt.step}, beyond train.steps={t.steps}; raise train.steps, "
                         "set train.resume_from to an earlier checkpoint_* folder, or choose another train.output_name")
    log.info("resuming from %s (step %d)", ckpt.folder, ckpt.step)
    return ckpt


def is_finished(run_dir: Path, ckpt: Checkpoint, steps: int, final_name: str = "lora_final.safetensors") -> bool:
    """True when the run reached ``steps`` and its final LoRA was written at that step."""
    final = Path(run_dir) / final_name
    if ckpt.step != steps or not final.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(final), framework="pt") as f:
            return (f.metadata() or {}).get("flowtrain.steps") == str(steps)
    except Exception as e:  # a damaged final file: retrain the last (zero) steps to rewrite it
        log.warning("%s cannot be read (%s); writing it again", final, e)
        return False


def check_world_size(checkpoint_doc: dict, folder: Any, world_size: int) -> None:
    """Refuse to resume a checkpoint written with another number of ranks."""
    saved = int((checkpoint_doc.get("distributed") or {}).get("world_size", 1))
    if saved != world_size:
        raise ValueError(
            f"cannot resume {folder}: it was trained with {saved} rank(s) and this run has {world_size}; the global "
            f"batch (data.batch_size x ranks) and with it the data order would change. Run it again with "
            f"{f'{saved} ranks in all (torchrun --nproc-per-node, over one or several nodes)' if saved > 1 else 'a single process (no torchrun)'}"
            ", or choose another train.output_name to start a new run")


def plan_resume(run_dir: Path, config: Any, model_info: dict, world_size: int = 1) -> tuple[Optional[Checkpoint], bool]:
    """(the checkpoint to continue from or None, whether the run is already finished); a
    checkpoint written with another number of ranks is refused (``check_world_size``)."""
    ckpt = find_resume_point(run_dir, config, model_info)
    if ckpt is None:
        return None, False
    if is_finished(run_dir, ckpt, config.train.steps):
        return ckpt, True  # nothing left to train: loading it does not depend on the ranks
    check_world_size(ckpt.doc, ckpt.folder, world_size)
    return ckpt, False
