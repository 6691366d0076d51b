"""One rank of the data-parallel tests, started by ``python -m torch.distributed.run``.

``dist_entry.py SPEC.json``: SPEC holds ``config`` (a TrainingConfig tree), ``results`` (a
folder for what the test compares: each rank's LoRA and run summary per run), ``runs`` (a
list of ``{"name", "stop_at"}``: ``train_lora`` calls one after the other, each with a
fresh model, so a later one resumes from the checkpoints of an earlier one; with
``stop_at`` rank 0 creates the run's ``.stop`` file after that step) and optionally
``other_ranks_output_dir`` (ranks > 0 get their own train.output_dir there, so the test can
see that they write nothing into it).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import tiny_parts  # tests/ is sys.path[0] for a script
from trainer_core import distributed
from trainer_core.config import TrainingConfig
from trainer_core.loop import Callback
from trainer_core.session import train_lora


class StopFileAt(Callback):
    """Creates ``<run>/.stop`` after step ``step``, as a user would (rank 0 runs it)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, logs) -> None:
        if state.step == self.step:
            (Path(state.extra["run_dir"]) / ".stop").touch()


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    distributed.init_from_env()
    rank = int(os.environ["RANK"])
    tree = spec["config"]
    if rank > 0 and spec.get("other_ranks_output_dir"):
        tree["train"]["output_dir"] = spec["other_ranks_output_dir"]
    config = TrainingConfig.from_dict(tree)
    out = Path(spec["results"])
    for run in spec["runs"]:
        model, codec, text = tiny_parts()
        callbacks = [StopFileAt(run["stop_at"])] if run.get("stop_at") else []
        result = train_lora(config, model, codec, text, callbacks=callbacks)
        name = f"{run['name']}_rank{rank}"
        save_file({k: v.detach().contiguous() for k, v in result.network.state_dict().items()},
                  str(out / f"{name}.safetensors"))
        summary = {"steps": result.steps, "reason": result.reason, "history": result.history,
                   "cache": result.dataset_summary.get("cache")}
        (out / f"{name}.json").write_text(json.dumps(summary), encoding="utf-8")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
