"""Data-parallel training over ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m trainer_core train ...`` starts N processes (ranks) with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
``init_from_env`` joins them into one process group (NCCL for CUDA tensors, Gloo for CPU
tensors) and gives each rank ``cuda:LOCAL_RANK`` when there is a GPU. ``train_lora`` then
asks ``current()`` for the run's ``DataParallel`` (or ``SINGLE`` when not launched so):

* **batches**: ``data.batch_size`` is per rank. Every rank builds the same *global* batch
  of ``batch_size × world_size`` samples (the dataset's epoch plan, caption choices and
  dropout, flips, σ and noise all drawn as one process with that batch would draw them,
  from the same per-step generator) and trains on its own contiguous slice of it
  (``shard``, through the loop's ``state.extra["shard"]`` seam). N ranks × batch b is
  therefore the same run as one process × batch N·b.
* **gradients**: after the last micro-batch of a step the LoRA gradients (and the step's
  loss terms) are summed over the ranks with one ``all_reduce`` per dtype and divided by
  the world size, before clipping and the optimizer step (``wrap_backward``). A rank's
  loss is weighted by its share of the global batch, so an uneven last batch of a bucket
  still averages exactly like one process. Every rank then takes the same optimizer step,
  so the replicas never drift (no DDP wrapper: the adapter calls the transformer itself,
  and LoRA gradients are small enough that overlapping the reduction with backward would
  save little).
* **files**: rank 0 alone writes (run folder, checkpoints, LoRA, logs, previews, reports,
  latent caches). The other ranks run only callbacks marked ``all_ranks`` (per-step seeding,
  schedule-free mode switches), read the caches after rank 0 filled them
  (``main_first``) and get the resume decision and checkpoint from rank 0 (``on_main``).
* **stopping**: after every step rank 0 decides whether the run ends (a signal, a ``.stop``
  file, any callback's ``StopTraining``, an error in its callbacks) and broadcasts the
  decision; all ranks stop after the same step.
* **resume**: rank 0 plans the resume and sends the checkpoint to the others; the checkpoint
  records the world size (``meta``) and resuming with another one is refused
  (``resume.check_world_size``: the global batch, and with it the data order, would change).

See docs/distributed.md for commands, multi-node launching and FSDP2 for models that do not
fit one GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .loop import Backward, Callback, RunState, StopTraining, end_training
from .types import Batch, TextBatch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- launching
def launched() -> bool:
    """True when a launcher (torchrun, ``accelerate launch``) started this process as one
    of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> Optional[torch.device]:
    """Join the process group described by the launcher's environment; returns this
    rank's device (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), or None when
    the process was not launched as one of several ranks. Ranks other than 0 log warnings
    and errors only."""
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s); "
                               "launch at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (e.g. a CPU-resident model) still reduce through gloo
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if dist.get_rank() != 0:
        logging.getLogger("trainer_core").setLevel(logging.WARNING)
    log.info("data parallel: %d ranks (%s), this is rank %d on %s", dist.get_world_size(), backend,
             dist.get_rank(), device)
    return device


def shutdown() -> None:
    _CURRENT.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_CURRENT: dict[tuple[int, int], "DataParallel"] = {}


def current() -> "SingleProcess | DataParallel":
    """The data-parallel context of this process: ``DataParallel`` (one per process group,
    shared by every caller) when a process group of more than one rank is initialised,
    else ``SINGLE``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        key = (dist.get_rank(), dist.get_world_size())
        if key not in _CURRENT:
            _CURRENT.clear()
            _CURRENT[key] = DataParallel(*key)
        return _CURRENT[key]
    return SINGLE


# --------------------------------------------------------------------------- pure helpers
def share(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share of ``n`` samples; shares differ in
    size by at most one, and ``n = world·b`` gives rank r the samples ``r·b .. r·b+b-1``."""
    return n * rank // world, n * (rank + 1) // world


def _rows(x: Any, rows: slice) -> Any:
    if x is None:
        return None
    if isinstance(x, TextBatch):
        return TextBatch(x.context[rows], None if x.pooled is None else x.pooled[rows])
    return x[rows]


def slice_batch(batch: Batch, rows: slice) -> Batch:
    """The samples ``rows`` of ``batch`` (text keeps the global batch's padding length)."""
    return Batch(latents=batch.latents[rows], text=_rows(batch.text, rows), captions=batch.captions[rows],
                 sources=batch.sources[rows], extras={k: _rows(v, rows) for k, v in batch.extras.items()},
                 references=[r[rows] for r in batch.references])


# --------------------------------------------------------------------------- single process
class SingleProcess:
    """What ``train_lora`` sees in a plain single process: every hook is a no-op."""

    rank, world_size, is_main = 0, 1, True

    def data_config(self, data):
        return data

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    def on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def attach(self, state: RunState) -> None: ...

    def wrap_backward(self, backward: Backward) -> Backward:
        return backward

    def wrap_callbacks(self, callbacks: list, should_stop: Callable[[], bool]) -> tuple[list, Callable[[], bool]]:
        return callbacks, should_stop

    def meta(self) -> dict:
        return {"distributed": {"world_size": 1}}


SINGLE = SingleProcess()


# --------------------------------------------------------------------------- data parallel
class DataParallel(SingleProcess):
    """Hooks ``train_lora`` applies when several ranks train one LoRA (module docstring)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.weight = 1.0  # this rank's share of the current micro-batch × world size
        self.accum = 1
        self._calls = 0
        self._terms: dict[str, torch.Tensor] = {}
        self.step_terms: dict[str, float] = {}

    def data_config(self, data):
        """The dataset is built with the *global* batch size; ``shard`` takes this rank's part."""
        return dataclasses.replace(data, batch_size=data.batch_size * self.world_size)

    # ---- agreement: rank 0 decides, everyone learns the outcome
    def _broadcast(self, obj: Any = None) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _send_error(self, e: BaseException) -> None:
        """Tell the other ranks that rank 0 failed; they raise the same exception."""
        try:
            pickle.dumps(e)
        except Exception:  # an exception that cannot travel: its message does
            e = RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
        self._broadcast(("error", e))

    def _receive(self) -> Any:
        kind, value = self._broadcast()
        if kind == "error":
            raise value
        return value

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; every rank returns its result or raises its exception."""
        if not self.is_main:
            return self._receive()
        try:
            result = fn()
        except BaseException as e:
            self._send_error(e)
            raise
        self._broadcast(("ok", result))
        return result

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling the caches), then the other ranks (reading
        them); an error on rank 0 is raised on every rank."""
        if not self.is_main:
            self._receive()
            yield
            return
        try:
            yield
        except BaseException as e:
            self._send_error(e)
            raise
        self._broadcast(("ok", None))

    # ---- the training hooks
    def attach(self, state: RunState) -> None:
        """Install the batch shard and start every rank from rank 0's LoRA weights."""
        self.accum = state.config.optim.grad_accum
        self._calls, self._terms, self.step_terms = 0, {}, {}
        state.extra["shard"] = self.shard
        with torch.no_grad():
            for p in state.network.parameters():
                dist.broadcast(p.data, src=0)

    def shard(self, batch: Batch, x0, sigma, noise, input_noise):
        """This rank's rows of the global micro-batch and of its σ and noise draws. A rank
        left without a sample (a batch smaller than the world) trains on a stand-in sample
        with weight 0, so it still joins the gradient reduction."""
        n = x0.shape[0]
        lo, hi = share(n, self.world_size, self.rank)
        self.weight = (hi - lo) * self.world_size / n
        rows = slice(lo, hi) if hi > lo else slice(0, 1)
        return slice_batch(batch, rows), x0[rows], sigma[rows], noise[rows], input_noise[rows]

    def wrap_backward(self, backward: Backward) -> Backward:
        def data_parallel_backward(values: dict[str, torch.Tensor], params: list[torch.Tensor], scale: float) -> None:
            backward(values, params, scale * self.weight)
            for k, v in values.items():
                self._terms[k] = self._terms.get(k, 0.0) + v.detach().float() * (scale * self.weight)
            self._calls += 1
            if self._calls % self.accum == 0:
                self.reduce(params)

        return data_parallel_backward

    def reduce(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients (and the step's loss terms) over the ranks: one all_reduce
        per gradient dtype."""
        params = list(params)
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        names = sorted(self._terms)
        device = grads[0].device if grads else torch.device("cpu")
        losses = torch.stack([torch.as_tensor(self._terms[k], device=device).reshape(()) for k in names]) \
            if names else torch.zeros(0, device=device)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.dtype, g.device), []).append(g)
        groups.setdefault((torch.float32, device), []).append(losses)
        for tensors in groups.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for t in tensors:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        self.step_terms = dict(zip(names, losses.tolist()))
        self._terms = {}

    def wrap_callbacks(self, callbacks: list, should_stop: Callable[[], bool]) -> tuple[list, Callable[[], bool]]:
        """All callbacks behind one ``RankCallbacks``; the loop's own ``should_stop`` is
        replaced by rank 0's broadcast decision."""
        return [RankCallbacks(self, callbacks, should_stop)], lambda: False

    def meta(self) -> dict:
        return {"distributed": {"world_size": self.world_size}}


class RankCallbacks(Callback):
    """A rank's callbacks run as one: rank 0 runs them all, the others only those marked
    ``all_ranks``. After each step the logs get the loss averaged over the ranks, and rank
    0's stop decision (a callback's ``StopTraining``, ``should_stop()``, an error) is
    broadcast, so every rank ends after the same step."""

    all_ranks = True

    def __init__(self, dp: DataParallel, callbacks: Sequence[Any], should_stop: Callable[[], bool]):
        self.dp, self.should_stop = dp, should_stop
        self.callbacks = list(callbacks) if dp.is_main else [c for c in callbacks if getattr(c, "all_ranks", False)]

    def on_train_start(self, state: RunState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step_start(self, state: RunState) -> None:
        for cb in self.callbacks:
            cb.on_step_start(state)

    def on_step_end(self, state: RunState, logs: dict) -> None:
        self._global_loss(state, logs)
        if not self.dp.is_main:
            for cb in self.callbacks:
                cb.on_step_end(state, logs)
            reason = self.dp._receive()  # raises what rank 0's callbacks raised
        else:
            reason = None
            try:
                for cb in self.callbacks:
                    cb.on_step_end(state, logs)
                if self.should_stop():
                    reason = "stopped"
            except StopTraining as stop:
                reason = stop.reason
            except BaseException as e:
                self.dp._send_error(e)
                raise
            self.dp._broadcast(("ok", reason))
        if reason is not None:
            raise StopTraining(reason)

    def on_train_end(self, state: RunState, reason: str) -> None:
        end_training(state, self.callbacks, reason)  # phase by phase: the saving first

    def _global_loss(self, state: RunState, logs: dict) -> None:
        """Replace the rank's own loss terms in the logs (and the history) by the global ones."""
        terms = self.dp.step_terms
        if not terms:
            return
        if isinstance(logs.get("terms"), dict):
            logs["terms"].clear()
            logs["terms"].update(terms)
        logs["loss"] = sum(terms.values())
        if state.history and state.history[-1].get("step") == state.step:
            state.history[-1]["loss"] = logs["loss"]
            if isinstance(state.history[-1].get("terms"), dict):
                state.history[-1]["terms"] = logs["terms"]
