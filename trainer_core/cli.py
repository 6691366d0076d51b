"""Command line: ``python -m trainer_core demo``, ``train`` and ``estimate``.

``demo`` trains a LoRA end to end on the embedded default (a small FLUX.1-layout model,
a DCT image codec, a hashing text encoder and a generated dataset): no download.
``train`` points the same engine at a local diffusers-format FLUX.1 folder and an image
folder. Ctrl+C (or SIGTERM) stops after the current step and saves the LoRA.
Both train data-parallel on several processes or GPUs when launched by ``torchrun``
(docs/distributed.md).
``estimate`` prints the peak memory of a training step by component for a released model
shape (flux1-dev, klein-9b, ...) or a model file/folder, and the plan chosen for a budget.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import distributed
from .config import ConfigError, TrainingConfig, field_names, suggest, with_user_names
from .loop import NonFiniteLoss
from .terminal import TerminalPhases, TerminalProgress, log_handler

log = logging.getLogger("trainer_core")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# command-line flags → the config field each sets (errors about a field name the flag too)
FLAG_FIELDS = {"--name": "train.output_name", "--output-dir": "train.output_dir", "--steps": "train.steps",
               "--data": "data.path", "--trigger": "data.captions.trigger_word",
               "--class-word": "data.captions.class_word", "--rank": "lora.rank", "--lr": "optim.lr",
               "--resolution": "data.buckets.resolutions"}


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    """``section.field=value`` pairs onto a config dict: JSON values (bare strings allowed);
    a text field takes the text as typed (``--set train.output_name=123`` is the name "123")."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. optim.lr=2e-4")
        node = base
        *path, leaf = key.split(".")
        hint = suggest(key, field_names(TrainingConfig))
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section{hint}; sections: "
                                  f"{sorted(k for k, v in node.items() if isinstance(v, dict))}")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            what = "a section, not a field" if isinstance(node.get(leaf), dict) else "an unknown field"
            fields = sorted(k for k, v in node.items() if not isinstance(v, dict))
            sections = sorted(k for k, v in node.items() if isinstance(v, dict))
            here = f"fields here: {fields}" if fields else f"write section.field; sections: {sections}"
            raise ConfigError(f"--set {item!r}: {key!r} is {what}{hint}; {here}")
        node[leaf] = value if isinstance(node[leaf], str) else _parse_value(value)
    return base


class StopFlag:
    """SIGINT/SIGTERM ask for a clean stop (checked after each step); a second SIGINT aborts.
    A SIGINT within ``GRACE_S`` of the first is the same Ctrl+C delivered twice (under
    torchrun a rank gets it from the terminal and again from torchrun), not a second press."""

    GRACE_S = 2.0

    def __init__(self) -> None:
        self.event = threading.Event()
        self.first = 0.0

    def install(self) -> None:
        def handler(signum, frame):
            if self.event.is_set():
                if signum == signal.SIGINT and time.monotonic() - self.first > self.GRACE_S:
                    raise KeyboardInterrupt
                return
            log.warning("\nstop requested (%s): finishing this step and saving", signal.Signals(signum).name)
            self.first = time.monotonic()
            self.event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def __call__(self) -> bool:
        return self.event.is_set()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="output", help="folder for run folders (default: output)")
    p.add_argument("--name", help="run name (run folder and LoRA names)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--config", type=Path, help="a JSON file with a full or partial config tree")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set optim.lr=2e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    prog = "flowtrain" if Path(sys.argv[0]).name == "flowtrain" else "python -m trainer_core"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a LoRA on the embedded demo (no download, ~2 min on CPU)")
    _common(demo)
    train = sub.add_parser("train", help="train on a local diffusers FLUX.1 folder and an image folder")
    _common(train)
    train.add_argument("--model", required=True, type=Path, help="diffusers-format FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/)")
    train.add_argument("--data", required=True, type=Path, help="image folder with same-name .txt captions")
    train.add_argument("--trigger", default="", help="trigger word")
    train.add_argument("--class-word", default="", help="class word (e.g. 'dog')")
    train.add_argument("--rank", type=int, help="LoRA rank")
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--resolution", type=int, nargs="+", help="bucket resolutions, e.g. 512 768")
    train.add_argument("--device", default="auto",
                       help="where to train: auto (the GPU when there is one, else the CPU), cuda, cuda:N or cpu; "
                            "under torchrun each rank takes cuda:LOCAL_RANK")
    train.add_argument("--algorithm", help="adapter algorithm: lora, dora, loha or lokr (lora.algorithm)")
    train.add_argument("--init-from", type=Path, help="continue from this LoRA file (lora.init_from)")
    est = sub.add_parser("estimate", help="memory a training run needs, by component, and the plan for a budget")
    est.add_argument("--model", default="flux1-dev",
                     help="a released shape (flux1-dev, flux1-schnell, klein-4b, klein-9b, flux2-dev, chroma), a FLUX "
                          ".safetensors file or a diffusers folder")
    est.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], help="training resolutions")
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--rank", type=int, default=16)
    est.add_argument("--targets", default="attention", help="attention, all, or a regex on block-relative names")
    est.add_argument("--optimizer", default="adamw")
    est.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"])
    est.add_argument("--weights", default="bf16", choices=["bf16", "fp8"], help="stored base weights (named shapes)")
    est.add_argument("--budget", type=float, default=8.0, help="memory budget in GB (0 = no limit)")
    est.add_argument("--margin", type=float, default=0.5, help="GB kept free (see memory.margin_gb)")
    est.add_argument("--streaming", default="auto", choices=["auto", "off", "all"])
    return parser


def estimate_command(args: argparse.Namespace) -> str:
    """The text ``estimate`` prints (also used by the tests)."""
    from . import budget as budget_mod
    from .memory import KNOWN_SHAPES, GiB, RunShape, estimate, known_shape
    from .shape_files import shape_from_path

    fp8 = args.weights == "fp8"
    shape = known_shape(args.model, 1.0 if fp8 else 2.0) if args.model in KNOWN_SHAPES else shape_from_path(args.model)
    limit = budget_mod.UNLIMITED if not args.budget else (args.budget - args.margin) * GiB
    lines = [f"{shape.name}: {shape.double_blocks}+{shape.single_blocks} blocks, hidden {shape.hidden}, "
             f"{shape.total_bytes / GiB:.1f} GB of weights"]
    for res in args.resolution:
        run = RunShape(resolution=res, batch=args.batch, rank=args.rank, targets=args.targets,
                       lora_bytes=4 if args.lora_dtype == "fp32" else 2, optimizer=args.optimizer,
                       casts_weights=fp8 or shape.weight_bytes != 2)
        lines.append(f"\n{res}x{res}, batch {args.batch}, rank {args.rank} ({args.targets}), {args.optimizer}")
        lines.append("  without checkpointing, all resident:")
        lines.append(estimate(shape, run, checkpoint="off").table())
        try:
            plan = budget_mod.plan_memory(shape, run, limit, streaming=args.streaming)
        except budget_mod.MemoryBudgetError as e:
            lines.append(f"  budget {args.budget:g} GB: REFUSED: {e}")
            continue
        lines.append(f"  budget {args.budget:g} GB -> {plan.summary()}:")
        lines.append(plan.estimate.table())
    return "\n".join(lines)


def make_config(args: argparse.Namespace, defaults: dict) -> TrainingConfig:
    tree = TrainingConfig().to_dict()
    for section, values in defaults.items():
        tree[section].update(values)
    if args.config:
        try:
            loaded = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {args.config}: cannot read JSON ({e})") from None
        loaded = loaded.get("config", loaded)  # accept a run's config.json as is
        for section, values in loaded.items():
            if section not in tree:
                raise ConfigError(f"--config {args.config}: unknown section {section!r}; known: {sorted(tree)}")
            _deep_update(tree[section], values)
    flags = {"train.output_dir": args.output_dir, "train.output_name": args.name, "train.steps": args.steps}
    for key in ("trigger", "class_word", "rank", "lr", "resolution", "algorithm", "init_from"):
        if getattr(args, key, None) not in (None, ""):
            flags[{"trigger": "data.captions.trigger_word", "class_word": "data.captions.class_word",
                   "rank": "lora.rank", "lr": "optim.lr", "resolution": "data.buckets.resolutions",
                   "algorithm": "lora.algorithm", "init_from": "lora.init_from"}[key]] = getattr(args, key)
    if flags.get("lora.init_from") is not None:
        flags["lora.init_from"] = str(flags["lora.init_from"])
    if getattr(args, "data", None):
        flags["data.path"] = str(args.data)
    for key, value in flags.items():
        if value is not None:
            node = tree
            *path, leaf = key.split(".")
            for part in path:
                node = node[part]
            node[leaf] = value
    apply_overrides(tree, args.set)
    given = {field: flag for flag, field in FLAG_FIELDS.items()
             if getattr(args, flag[2:].replace("-", "_"), None) not in (None, "")}
    try:
        return TrainingConfig.from_dict(tree)
    except ConfigError as e:
        raise with_user_names(e, given) from None


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def resolve_device(name: str):
    """``--device``: auto (CUDA when visible, else CPU), cpu, cuda or cuda:N; a GPU that is not
    there is refused with what is visible."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) visible; use --device auto "
                             "or cpu" + (f", or cuda:0..cuda:{count - 1}" if count else ""))
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[log_handler()])
    logging.getLogger("trainer_core.phases").setLevel(logging.WARNING)  # TerminalPhases shows the counts
    args = build_parser().parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        if args.command == "estimate":
            print(estimate_command(args))
            return 0
        device = distributed.init_from_env()  # under torchrun: join the other ranks (data parallel)
        if args.command == "demo":
            from .demo.run import run_demo

            run_demo(args, stop=stop, progress=TerminalProgress(), make_config=make_config,
                     phase_progress=TerminalPhases())
        else:
            from .models.local import load_diffusers_flux_folder
            from .session import DTYPES, check_before_loading, train_lora

            config = make_config(args, {})
            check_before_loading(config)  # the data folder, captions and run folder: before the slow load
            if device is None:  # not under torchrun: as --device says
                device = resolve_device(args.device)
            model, codec, text = load_diffusers_flux_folder(args.model, dtype=DTYPES[config.train.precision], device=device,
                                                            base_quantization=config.train.base_quantization)
            result = train_lora(config, model, codec, text, release_encoders=lambda: (codec.release(), text.release()),
                                progress=TerminalProgress(), should_stop=stop, base_model=str(args.model),
                                phase_progress=TerminalPhases(), model_name=Path(args.model).name)
            log.info("LoRA: %s (%s after %d steps)", result.lora_path, result.reason, result.steps)
    except (ConfigError, ValueError, FileNotFoundError, NonFiniteLoss, OSError) as e:
        # each of these carries a message that names the file or setting and the fix
        log.error("error: %s", e)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
