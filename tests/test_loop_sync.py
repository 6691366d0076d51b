"""The training step waits for the device once: loop.py, optim.py and the LoRA layers read no
tensor value back to the host except in the step's one batched transfer."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from trainer_core.loop import Callback

WATCHED = tuple(str(Path(__file__).resolve().parents[1] / "trainer_core" / f) for f in ("loop.py", "optim.py", "lora"))
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.cpu, torch.Tensor.numpy}


class CountReads(TorchFunctionMode):
    """Counts host reads of tensor values made directly by the watched modules."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = sys._getframe(1)
            while caller and caller.f_code.co_filename.endswith(("overrides.py", "_tensor.py")):
                caller = caller.f_back
            if caller and caller.f_code.co_filename.startswith(WATCHED):
                self.calls.append(f"{func.__name__} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


class Watch(Callback):
    def __init__(self):
        self.per_step: list[list[str]] = []
        self.mode = None

    def on_step_start(self, state):
        self.mode = CountReads()
        self.mode.__enter__()

    def on_step_end(self, state, logs):
        self.mode.__exit__(None, None, None)
        self.per_step.append(self.mode.calls)


def test_one_host_read_per_step_with_accumulation_and_clipping(tiny_training):
    watch = Watch()
    cfg = tiny_training.config(**{"train.steps": 2, "optim.grad_accum": 2, "optim.max_grad_norm": 1.0})
    result = tiny_training.train(cfg, callbacks=[watch])
    assert len(watch.per_step) == 2
    for calls in watch.per_step:
        assert len(calls) == 1 and calls[0].startswith("tolist at loop.py"), calls
    assert all(isinstance(h["loss"], float) for h in result.history)
