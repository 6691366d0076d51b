"""Command line: ``python -m trainer_core demo`` and ``python -m trainer_core train``.

``demo`` trains a LoRA end to end on the embedded default (a small FLUX.1-layout model,
a DCT image codec, a hashing text encoder and a generated dataset): no download.
``train`` points the same engine at a local diffusers-format FLUX.1 folder and an image
folder. Ctrl+C (or SIGTERM) stops after the current step and saves the LoRA.
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

from .config import ConfigError, TrainingConfig
from .loop import NonFiniteLoss

log = logging.getLogger("trainer_core")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    """``section.field=value`` pairs (JSON values, bare strings allowed) onto a config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. optim.lr=2e-4")
        node = base
        *path, leaf = key.split(".")
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section; sections: {sorted(k for k, v in base.items() if isinstance(v, dict))}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"--set {item!r}: unknown field {leaf!r}; known: {sorted(node)}")
        node[leaf] = _parse_value(value)
    return base


class TerminalProgress:
    """One updating line on stderr: step, loss, its moving average, speed, ETA. Speed is
    measured from the first step reported (caching and sampling before it do not count)."""

    def __init__(self) -> None:
        self.start: tuple[int, float] | None = None
        self.avg: float | None = None

    def __call__(self, step: int, total: int, logs: dict) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = (step - 1, now - logs.get("seconds", 0.0))
        loss = logs["loss"]
        self.avg = loss if self.avg is None else 0.95 * self.avg + 0.05 * loss
        rate = (now - self.start[1]) / max(step - self.start[0], 1)
        eta = rate * (total - step)
        sys.stderr.write(f"\r  step {step:>5}/{total}  loss {loss:.4f}  avg {self.avg:.4f}  "
                         f"{rate:.3f}s/step  eta {eta:4.0f}s ")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class StopFlag:
    """SIGINT/SIGTERM ask for a clean stop (checked after each step); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        def handler(signum, frame):
            if self.event.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("\nstop requested (%s): finishing this step and saving", signal.Signals(signum).name)
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
    parser = argparse.ArgumentParser(prog="python -m trainer_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser


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
    for key in ("trigger", "class_word", "rank", "lr", "resolution"):
        if getattr(args, key, None) not in (None, ""):
            flags[{"trigger": "data.captions.trigger_word", "class_word": "data.captions.class_word",
                   "rank": "lora.rank", "lr": "optim.lr", "resolution": "data.buckets.resolutions"}[key]] = getattr(args, key)
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
    return TrainingConfig.from_dict(tree)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        if args.command == "demo":
            from .demo.run import run_demo

            run_demo(args, stop=stop, progress=TerminalProgress(), make_config=make_config)
        else:
            import torch

            from .models.local import load_diffusers_flux_folder
            from .session import DTYPES, train_lora

            config = make_config(args, {})
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model, codec, text = load_diffusers_flux_folder(args.model, dtype=DTYPES[config.train.precision], device=device,
                                                            base_quantization=config.train.base_quantization)
            result = train_lora(config, model, codec, text, release_encoders=lambda: (codec.release(), text.release()),
                                progress=TerminalProgress(), should_stop=stop, base_model=str(args.model))
            log.info("LoRA: %s (%s after %d steps)", result.lora_path, result.reason, result.steps)
    except (ConfigError, ValueError, FileNotFoundError, NonFiniteLoss, OSError) as e:
        # each of these carries a message that names the file or setting and the fix
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
