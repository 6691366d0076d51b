"""Weight streaming (block offload) for training, device-agnostic.

A plan (``trainer_core.budget.MemoryPlan``) names the transformer blocks whose frozen
weights do not stay on the compute device. ``BlockStreamer`` keeps those weights in
*storage* (CPU memory, pinned when the compute device is CUDA) and, around each call of
such a block, swaps *compute copies* into the module's parameter slots:

* ``use(name)`` (a context manager around the block call) fetches the block's weights (or
  waits for the prefetch already under way), starts copying the next streamed block in
  the direction of travel (forward: the following block; inside backward: the previous
  one, because with block checkpointing the recompute runs blocks in reverse), runs the
  block, then puts the storage tensors back in the slots. The compute copies are freed as
  soon as nothing holds them: at once in a checkpointed forward, after the block's
  backward in a recompute.
* On CUDA copies run on a side stream (``non_blocking`` from pinned memory) and the
  compute stream waits on a CUDA event; ``record_stream`` keeps the allocator from reusing
  a copy's memory while the compute stream may still read it. On any other device the copy
  is synchronous into separate tensors, so the same code path runs (and is tested) on a CPU.
* The storage IS the model's weights: no second copy. Only frozen tensors stream (peft's
  LoRA layers wrap base Linears; their trainable A/B and the optimizer state stay on the
  compute device, moved there on first use).
* A ledger counts the bytes of frozen weights on the compute device (resident weights plus
  live compute copies, decremented when a copy is garbage-collected) and refuses a fetch
  that would exceed ``limit``: prefetches are skipped, a needed fetch raises.

Streamed blocks need recompute-style checkpointing: without it autograd saves every
block's weights for the backward and the copies would all stay alive.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class StreamingBudgetError(RuntimeError):
    """A fetch would put more weight bytes on the device than the plan allows."""


class Ledger:
    """Bytes of frozen weights on the compute device; ``peak`` is the most ever held."""

    def __init__(self, limit: Optional[float]):
        self.limit = float("inf") if limit is None else float(limit)
        self.current = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.current + nbytes <= self.limit

    def add(self, nbytes: int) -> None:
        if not self.fits(nbytes):
            raise StreamingBudgetError(
                f"streaming ledger: {self.current + nbytes} bytes of weights would be on the device, over the "
                f"plan's limit of {self.limit:.0f}; stream more blocks or raise the memory budget")
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def release(self, nbytes: int) -> None:
        self.current -= nbytes


def _frozen_slots(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, slot name, is parameter, tensor) of every frozen tensor of ``block``."""
    out, seen = [], set()
    for owner in block.modules():
        for is_param, slots in ((True, owner._parameters), (False, owner._buffers)):
            for key, t in slots.items():
                if t is None or (is_param and t.requires_grad) or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append((owner, key, is_param, t))
    return out


def _nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` occupies: for a wrapper tensor subclass (e.g. ComfyUI's quantized
    weights: fp8 data + scales behind a bf16-looking shape) the sum of its inner tensors
    (``__tensor_flatten__``), as the memory plan counts them, not shape × reported dtype."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ctx = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class BlockStreamer:
    """Streams the frozen weights of ``streamed`` blocks (names in ``blocks``, which is in
    execution order) to ``device`` around each use; see the module docstring."""

    def __init__(self, blocks: dict[str, nn.Module], streamed: Sequence[str], device, *,
                 limit: Optional[float] = None, prefetch: bool = True):
        unknown = [n for n in streamed if n not in blocks]
        if unknown:
            raise ValueError(f"streaming plan names unknown blocks {unknown[:3]}; known e.g. {list(blocks)[:3]}")
        self.blocks = dict(blocks)
        self.order = list(blocks)
        self.streamed = [n for n in self.order if n in set(streamed)]
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.storage_device = torch.device("cpu")
        self.prefetch = prefetch
        self.ledger = Ledger(limit)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pending: dict[str, tuple[list, Optional[torch.cuda.Event]]] = {}
        self._resident = 0
        self.fetches = 0
        self.attached = False

    # ------------------------------------------------------------------ placement
    def attach(self, module: Optional[nn.Module] = None) -> None:
        """Put streamed blocks' frozen weights in storage (pinned CPU memory for CUDA), one
        tensor at a time, and count the frozen bytes of ``module`` (the whole model, default
        the blocks) that stay on the compute device as the ledger's resident base."""
        for name in self.streamed:
            for owner, key, is_param, t in _frozen_slots(self.blocks[name]):
                if t.device != self.storage_device or (self.cuda and not t.is_pinned()):
                    data = t.data.to(self.storage_device)
                    t.data = data.pin_memory() if self.cuda else data
        streamed_ids = {id(t) for n in self.streamed for *_, t in _frozen_slots(self.blocks[n])}
        roots = [module] if module is not None else list(self.blocks.values())
        for root in roots:  # everything else lives on the compute device
            for t in list(root.parameters()) + list(root.buffers()):
                if id(t) not in streamed_ids and t.device != self.device:
                    t.data = t.data.to(self.device)
        seen = set()
        for root in roots:
            for *_, t in _frozen_slots(root):
                if id(t) not in streamed_ids and id(t) not in seen:
                    seen.add(id(t))
                    self._resident += _nbytes(t)
        self.ledger.add(self._resident)
        for name in self.streamed:
            self._place_trainable(self.blocks[name])
        self.attached = True
        log.info("streaming %d of %d blocks to %s (%.2f GB resident weights, limit %s)", len(self.streamed),
                 len(self.order), self.device, self._resident / 2**30,
                 "none" if self.ledger.limit == float("inf") else f"{self.ledger.limit / 2**30:.2f} GB")

    def detach(self) -> None:
        """Drop pending prefetches and the ledger's resident base (the weights stay where
        they are: storage for streamed blocks)."""
        self._pending.clear()
        if self.attached:
            self.ledger.release(self._resident)
            self._resident, self.attached = 0, False

    def _place_trainable(self, block: nn.Module) -> None:
        """LoRA layers injected after ``attach`` were created next to their base weight, in
        storage: move them (values, same Parameter objects) to the compute device."""
        for p in block.parameters():
            if p.requires_grad and p.device != self.device:
                p.data = p.data.to(self.device)

    # ------------------------------------------------------------------ fetching
    def _copy(self, name: str, *, required: bool) -> bool:
        """Start copying ``name``'s frozen weights to the device; False if it does not fit."""
        slots = _frozen_slots(self.blocks[name])
        need = sum(_nbytes(t) for *_, t in slots)
        if not required and not self.ledger.fits(need):
            return False
        self.ledger.add(need)
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        copies = []
        with ctx:
            for owner, key, is_param, t in slots:
                c = t.to(self.device, non_blocking=True, copy=True)
                if is_param:
                    c = nn.Parameter(c, requires_grad=False)
                weakref.finalize(c, self.ledger.release, _nbytes(t))
                copies.append((owner, key, is_param, t, c))
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.stream)
        self._pending[name] = (copies, event)
        self.fetches += 1
        return True

    def _next(self, name: str, backward: bool) -> Optional[str]:
        i = self.streamed.index(name)
        j = i - 1 if backward else i + 1
        return self.streamed[j] if 0 <= j < len(self.streamed) else None

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the body with block ``name``'s weights on the device (a no-op for resident blocks)."""
        if name not in self._pending and name not in self.streamed:
            yield
            return
        if name not in self._pending:
            self._copy(name, required=True)
        copies, event = self._pending.pop(name)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        backward = torch._C._current_graph_task_id() != -1
        following = self._next(name, backward)
        if self.prefetch and following is not None and following not in self._pending:
            self._copy(following, required=False)
        self._place_trainable(self.blocks[name])
        try:
            for entry in copies:
                if self.cuda:
                    entry[4].record_stream(torch.cuda.current_stream(self.device))
                (entry[0]._parameters if entry[2] else entry[0]._buffers)[entry[1]] = entry[4]
            yield
        finally:
            for entry in copies:
                (entry[0]._parameters if entry[2] else entry[0]._buffers)[entry[1]] = entry[3]
            entry = None
            copies.clear()  # the compute copies now live only as long as autograd needs them


def block_table(module: nn.Module) -> dict[str, nn.Module]:
    """``double_blocks.i`` / ``single_blocks.j`` → block, in execution order."""
    table = {f"double_blocks.{i}": b for i, b in enumerate(module.double_blocks)}
    table.update({f"single_blocks.{j}": b for j, b in enumerate(module.single_blocks)})
    return table
