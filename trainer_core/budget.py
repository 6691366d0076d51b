"""From a memory budget to a plan: checkpointing and which transformer blocks stream.

``plan_memory(shape, run, budget)`` tries, fastest first: no recompute and everything
resident; block checkpointing and everything resident; block checkpointing and the fewest
streamed blocks that fit (largest blocks first: fewer blocks to fetch for the same bytes).
Streaming needs checkpointing: without it autograd keeps every block's weights for the
backward, so a streamed block would stay on the device anyway.

A run that does not fit even with every block streamed raises ``MemoryBudgetError``
before any model work, with the estimate and the cheapest changes that make it fit
(``suggest_changes``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from .memory import GiB, Estimate, ModelShape, RunShape, estimate

log = logging.getLogger(__name__)

UNLIMITED = float("inf")


class MemoryBudgetError(ValueError):
    """The run cannot fit the memory budget; the message has the estimate and the fix."""


@dataclass(frozen=True)
class MemoryPlan:
    checkpoint: str  # "off" | "blocks" | "selective"
    streamed: tuple[str, ...]  # block names (``double_blocks.3``) whose weights stream
    estimate: Estimate
    budget: float  # bytes (inf = unlimited)
    blocks: int  # blocks in the model

    @property
    def weight_limit(self) -> int:
        """Bytes of weights the streaming ledger may hold on the device: resident weights
        plus the streamed-block buffers."""
        return self.estimate.resident_weights + self.estimate.stream_buffers

    def summary(self) -> str:
        ckpt = {"off": "no checkpointing", "blocks": "block checkpointing",
                "selective": "selective checkpointing"}[self.checkpoint]
        budget = "no limit" if self.budget == UNLIMITED else f"{self.budget / GiB:.1f} GB"
        return (f"{len(self.streamed)} of {self.blocks} blocks streamed, {ckpt}, "
                f"est. peak {self.estimate.total / GiB:.1f} GB of {budget}")


def _fits(e: Estimate, budget: float) -> bool:
    return e.total <= budget


def plan_memory(shape: ModelShape, run: RunShape, budget: float, *, streaming: str = "auto",
                checkpoint: str = "auto") -> MemoryPlan:
    """The fastest plan within ``budget`` bytes. ``streaming``: auto | off | all.
    ``checkpoint``: auto, or a fixed mode (streaming then requires it to recompute).
    Raises ``MemoryBudgetError`` (with the estimate and fixes) when nothing fits."""
    plan = _best_plan(shape, run, budget, streaming, checkpoint)
    if _fits(plan.estimate, budget):
        return plan
    fixes = suggest_changes(shape, run, budget, streaming=streaming, checkpoint=checkpoint)
    hint = "; ".join(fixes) if fixes else "no single change fits: use a smaller model or a device with more memory"
    raise MemoryBudgetError(
        f"this run needs about {plan.estimate.total / GiB:.2f} GB ({plan.summary()}) but the memory budget is "
        f"{budget / GiB:.2f} GB. Estimate:\n{plan.estimate.table()}\nTo make it fit: {hint}")


def _best_plan(shape: ModelShape, run: RunShape, budget: float, streaming: str, checkpoint: str) -> MemoryPlan:
    """The fastest plan that fits, else the plan that comes closest."""
    if streaming not in ("auto", "off", "all"):
        raise ValueError(f"streaming={streaming!r}; expected auto, off or all")
    names = shape.block_names()
    by_size = sorted(names, key=shape.block_bytes, reverse=True)

    def make(mode: str, streamed: tuple[str, ...]) -> MemoryPlan:
        order = tuple(n for n in names if n in set(streamed))  # execution order
        return MemoryPlan(mode, order, estimate(shape, run, checkpoint=mode, streamed=order), budget, len(names))

    recompute = "blocks" if checkpoint in ("auto", "off") else checkpoint
    if streaming == "all":
        return make(recompute, tuple(names))
    candidates = [make(checkpoint if checkpoint != "auto" else "off", ())]
    if checkpoint == "auto":
        candidates.append(make("blocks", ()))
    for plan in candidates:
        if _fits(plan.estimate, budget):
            return plan
    if streaming == "off":
        return candidates[-1]
    # the fewest streamed blocks: binary search on k (estimates grow monotonically as k falls)
    lo, hi = 1, len(by_size)
    if not _fits(make(recompute, tuple(by_size)).estimate, budget):
        return make(recompute, tuple(by_size))
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(make(recompute, tuple(by_size[:mid])).estimate, budget):
            hi = mid
        else:
            lo = mid + 1
    return make(recompute, tuple(by_size[:lo]))


def suggest_changes(shape: ModelShape, run: RunShape, budget: float, *, streaming: str = "auto",
                    checkpoint: str = "auto") -> list[str]:
    """Single changes that make the run fit, cheapest (least effect on the result) first."""
    def fits(r: RunShape, s: str = streaming) -> bool:
        return _fits(_best_plan(shape, r, budget, s, checkpoint).estimate, budget)

    out: list[str] = []
    if streaming == "off" and fits(run, "auto"):
        out.append("allow weight streaming (memory.streaming='auto')")
    if run.optimizer != "adamw8bit" and fits(run.replace(optimizer="adamw8bit")):
        out.append("optimizer adamw8bit")
    if run.batch > 1 and fits(run.replace(batch=1)):
        out.append("batch size 1")
    rank = run.rank // 2
    while rank >= 4:
        if fits(run.replace(rank=rank)):
            out.append(f"LoRA rank {rank}")
            break
        rank //= 2
    if run.lora_bytes > 2 and fits(run.replace(lora_bytes=2)):
        out.append("lora.dtype bf16")
    resolution = run.resolution - 128
    while resolution >= 256:
        if fits(run.replace(resolution=resolution)):
            out.append(f"resolution {resolution}")
            break
        resolution -= 128
    if not out:  # no single change: the same steps together, in order, until it fits
        steps, r = [], run
        for label, changed in (("optimizer adamw8bit", r.replace(optimizer="adamw8bit")), ("batch size 1", None),
                               ("LoRA rank 8", None), ("lora.dtype bf16", None)):
            r = changed if changed is not None else {"batch size 1": r.replace(batch=1), "LoRA rank 8": r.replace(rank=min(r.rank, 8)),
                                                     "lora.dtype bf16": r.replace(lora_bytes=2)}[label]
            steps.append(label)
            if fits(r):
                return ["together: " + ", ".join(steps)]
        for resolution in range(run.resolution - 128, 255, -128):
            if fits(r.replace(resolution=resolution)):
                return ["together: " + ", ".join(steps + [f"resolution {resolution}"])]
    return out


def resolve_budget(budget_gb: float, margin_gb: float, device) -> float:
    """Bytes the run may use: ``budget_gb - margin_gb``; with ``budget_gb == 0`` (auto) on
    CUDA the memory free plus all this process' allocator holds (ComfyUI frees other models
    on demand, and the trained model's own weights are part of the estimate) minus the
    margin; on a CPU unlimited (the weights already live in the RAM the estimate counts)."""
    import torch

    margin = margin_gb * GiB
    if budget_gb:
        return budget_gb * GiB - margin
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device)) - margin
    return UNLIMITED


def describe(plan: MemoryPlan, shape: Optional[ModelShape] = None) -> str:
    """The summary line plus the estimate by component."""
    head = plan.summary() if shape is None else f"{shape.name}: {plan.summary()}"
    return f"{head}\n{plan.estimate.table()}"


def run_shape(config, *, compute_bytes: int, casts_weights: bool = False) -> RunShape:
    """The ``RunShape`` of a ``TrainingConfig``: its largest bucket resolution, batch, LoRA and
    optimizer (a custom target regex counts the Linears it matches)."""
    lora_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[config.lora.dtype]
    targets = config.lora.target_regex if config.lora.targets == "custom" else config.lora.targets
    return RunShape(resolution=max(config.data.buckets.resolutions), batch=config.data.batch_size,
                    rank=config.lora.rank, targets=targets, lora_bytes=lora_bytes, optimizer=config.optim.optimizer,
                    compute_bytes=compute_bytes, casts_weights=casts_weights,
                    references=1 if config.data.control_images else 0)
