"""The training loop: a short spine with three seams.

1. parameter groups (``optim.PARAM_GROUPS``) decide what the optimizer sees;
2. loss terms (``LossTerm``) are summed for one backward per micro-step (a ``Backward``
   strategy may combine their gradients otherwise, e.g. ``dop.pcgrad_backward``);
3. callbacks (``Callback``) react to the start, each finished step and the end
   (logging, EMA, checkpoints, previews, control files). At the end they run phase by
   phase (``Callback.end_phase``): what saving needs, the saving, the run's status, then
   the rest (previews) as best effort, so nothing after the saving can lose the run.

Every random choice of step k draws from ``step_generator(seed, k)``; data order is a
pure function of (seed, micro-step index). Resuming at step k therefore replays step k.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from .config import TrainingConfig
from .finite import all_finite, nonfinite_names
from .flow import SigmaParams, interpolate, sample_sigmas, step_generator, velocity_target
from .optim import grad_norm_clip
from .types import Batch, FlowModel, TextBatch

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Deterministic batches: ``batch(index, generator, step=)`` for micro-step ``index``
    of optimizer step ``step`` (for step-dependent choices such as a caption-dropout ramp)."""

    def batch(self, index: int, generator: torch.Generator, step: Optional[int] = None) -> Batch: ...


# (x0, generator) -> ε, or (ε, ε_input): ε is the target's noise, ε_input the noise of x_t
# (input perturbation; see noise.py). A single tensor is used for both.
NoiseFn = Callable[[torch.Tensor, torch.Generator], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def gaussian_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)


# (term values, trainable params, scale = 1/grad_accum) -> None: turns one micro-step's
# loss terms into accumulated ``.grad``s (e.g. ``dop.pcgrad_backward``).
Backward = Callable[[dict[str, torch.Tensor], list[torch.Tensor], float], None]


def sum_backward(values: dict[str, torch.Tensor], params: list[torch.Tensor], scale: float) -> None:
    """The default: one backward of the scaled sum of the terms."""
    (sum(values.values()) * scale).backward()


@dataclass
class StepContext:
    """Everything a loss term may use on one micro-step; the noisy input is built once."""

    step: int
    micro: int
    generator: torch.Generator
    batch: Batch
    model: FlowModel
    network: Any  # lora.LoraNetwork: .disabled() switches the LoRA off
    sigma: torch.Tensor  # [B] float32
    noise: torch.Tensor  # [B, C, h, w], the target's ε (x_t may use a perturbed one)
    x_t: torch.Tensor
    target: torch.Tensor
    guidance: float
    logs: dict[str, Any] = field(default_factory=dict)
    _main: Optional[torch.Tensor] = None

    def predict(self, text: Optional[TextBatch] = None) -> torch.Tensor:
        """Velocity on ``x_t``; with no ``text`` the batch's caption (computed once). Every
        prediction is conditioned on the batch's reference latents (edit data), if any."""
        if text is None:
            if self._main is None:
                self._main = self._velocity(self.batch.text)
            return self._main
        return self._velocity(text)

    def _velocity(self, text: TextBatch) -> torch.Tensor:
        if self.batch.references:  # only edit data passes the argument (any FlowModel takes the call)
            return self.model.velocity(self.x_t, self.sigma, text, self.guidance, references=self.batch.references)
        return self.model.velocity(self.x_t, self.sigma, text, self.guidance)


class LossTerm(Protocol):
    name: str

    def __call__(self, ctx: StepContext) -> Optional[torch.Tensor]: ...


END_PHASES = ("prepare", "save", "record", "after")
"""Order of ``on_train_end`` calls: ``prepare`` puts the weights to save in place (e.g.
schedule-free's averaged weights), ``save`` writes the LoRA and the checkpoint, ``record``
writes the run's status, ``after`` is everything else (previews, summaries)."""


class Callback:
    """Override what you need. ``state`` is the live ``RunState``. ``end_phase`` says when
    ``on_train_end`` runs (``END_PHASES``); a duck-typed callback without it is ``after``.
    In a data-parallel run (``distributed.py``) only rank 0 runs a callback, unless it sets
    ``all_ranks = True`` (callbacks that change the training state and write nothing)."""

    end_phase = "after"
    all_ranks = False

    def on_train_start(self, state: "RunState") -> None: ...

    def on_step_start(self, state: "RunState") -> None: ...

    def on_step_end(self, state: "RunState", logs: dict[str, Any]) -> None: ...

    def on_train_end(self, state: "RunState", reason: str) -> None: ...


class StopTraining(Exception):
    """Raised by a callback to end training cleanly after the current step."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NonFiniteLoss(RuntimeError):
    pass


class NonFiniteWeights(NonFiniteLoss):
    """An optimizer step left NaN/inf in the trainable weights or the optimizer state."""


def is_interrupt(error: BaseException) -> bool:
    """A user's interrupt: a BaseException that is not an Exception (KeyboardInterrupt,
    ComfyUI's InterruptProcessingException). It ends a run as "stopped", not as an error."""
    return not isinstance(error, Exception)


@dataclass
class RunState:
    config: TrainingConfig
    model: FlowModel
    network: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: BatchSource
    total_steps: int
    step: int = 0  # optimizer steps completed
    history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # callbacks' shared state (EMA, run dir)
    interrupted: bool = False  # a user's interrupt arrived: best-effort end work is skipped
    unsaveable: str = ""  # why the live weights must not be saved (non-finite after a step)


def make_context(state: RunState, step: int, micro: int, generator: torch.Generator,
                 noise_fn: NoiseFn = gaussian_noise) -> StepContext:
    cfg = state.config
    index = step * cfg.optim.grad_accum + micro
    batch = state.data.batch(index, generator, step=step)
    x0 = batch.latents.float()
    tokens = state.model.image_tokens(tuple(x0.shape[-2:]))
    params = SigmaParams(cfg.flow.sigmoid_mean, cfg.flow.sigmoid_std, cfg.flow.shift, tokens)
    sigma = sample_sigmas(x0.shape[0], scheme=cfg.flow.sigma_scheme, generator=generator, params=params).to(x0.device)
    noise = noise_fn(x0, generator)
    noise, input_noise = noise if isinstance(noise, tuple) else (noise, noise)
    if (shard := getattr(state, "extra", {}).get("shard")) is not None:  # data parallel: this rank's rows (distributed.py)
        batch, x0, sigma, noise, input_noise = shard(batch, x0, sigma, noise, input_noise)
    return StepContext(
        step=step, micro=micro, generator=generator, batch=batch, model=state.model,
        network=state.network, sigma=sigma, noise=noise, x_t=interpolate(x0, input_noise, sigma),
        target=velocity_target(x0, noise), guidance=cfg.flow.guidance,
    )


def train_step(state: RunState, terms: list[LossTerm], noise_fn: NoiseFn = gaussian_noise,
               backward: Backward = sum_backward) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the step's logs.

    The host waits for the device once per step: the term values and the gradient norm stay
    on the device until one transfer after the last backward, which also decides, for every
    micro-step, whether the loss was finite; a non-finite loss raises ``NonFiniteLoss`` before
    the optimizer steps, so the weights keep their last good values."""
    cfg = state.config
    accum = cfg.optim.grad_accum
    generator = step_generator(cfg.train.seed, state.step)
    totals: dict[str, torch.Tensor] = {}
    losses, per_sample, sigmas = [], [], []
    for micro in range(accum):
        ctx = make_context(state, state.step, micro, generator, noise_fn)
        values = {t.name: v for t in terms if (v := t(ctx)) is not None}
        backward(values, state.network.parameters(), 1.0 / accum)
        detached = {k: v.detach().float() for k, v in values.items()}
        losses.append(sum(detached.values()))
        for k, v in detached.items():
            totals[k] = totals[k] + v / accum if k in totals else v / accum
        if "per_sample" in ctx.logs:
            per_sample.append(ctx.logs["per_sample"])
            sigmas.append(ctx.sigma.detach())
    norm = grad_norm_clip(state.network.parameters(), cfg.optim.max_grad_norm)
    names = list(totals)
    scalars = [*losses, *(totals[k] for k in names), norm]
    device = next((x.device for x in scalars if isinstance(x, torch.Tensor)), torch.device("cpu"))
    flat = [torch.stack([torch.as_tensor(x, device=device).float().reshape(()) for x in scalars])]
    flat += [t.float().reshape(-1).to(device) for t in (*sigmas, *per_sample)]
    fetched = torch.cat(flat).tolist()  # the step's one host-device sync
    n, n_sigma = len(scalars), sum(t.numel() for t in sigmas)
    micro_losses, term_values, norm = fetched[:accum], fetched[accum:n - 1], fetched[n - 1]
    for loss in micro_losses:
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"loss is {loss} at step {state.step + 1} (terms: "
                f"{ dict(zip(names, term_values)) }); likely causes: learning rate too "
                f"high ({cfg.optim.lr}) or {cfg.train.precision} overflow; try a lower lr or fp32/bf16"
            )
    state.optimizer.step()
    check_weights(state, totals)
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    terms_logged = dict(zip(names, term_values))
    logs = {"step": state.step, "loss": sum(terms_logged.values()), "terms": terms_logged,
            "lr": state.optimizer.param_groups[0]["lr"], "grad_norm": norm}
    if per_sample:
        logs["sigma"], logs["per_sample"] = fetched[n:n + n_sigma], fetched[n + n_sigma:]
    return logs


def check_weights(state: RunState, terms: dict[str, float]) -> None:
    """After ``optimizer.step``: every trainable weight and optimizer-state tensor must be
    finite (one fused check, one host sync). Otherwise the live state is marked
    unsaveable (no checkpoint, no ``lora_final``) and ``NonFiniteWeights`` names the step."""
    params = state.network.parameters()
    if all_finite(params, list(state.optimizer.state.values())):
        return
    cfg = state.config
    names = dict(state.network.named_parameters()) if hasattr(state.network, "named_parameters") else {}
    bad = nonfinite_names(names) or ["(optimizer state)"]
    state.unsaveable = f"non-finite weights after step {state.step + 1}"
    raise NonFiniteWeights(
        f"step {state.step + 1} made the LoRA weights or optimizer state NaN/inf (e.g. {', '.join(bad)}) although "
        f"its loss was finite ({sum(terms.values()):.4g}); likely causes: learning rate too high "
        f"(optim.lr={cfg.optim.lr}), {cfg.train.precision} overflow (fp16 overflows easily: use bf16 or fp32), "
        "or broken base-model weights (NaN/inf in the model file)")


def end_training(state: RunState, callbacks, reason: str, error: Optional[BaseException] = None) -> None:
    """Every callback's ``on_train_end``, phase by phase (``END_PHASES``). Each runs even
    when an earlier one raised, so a preview interrupted by a Cancel cannot stop the
    saving; the first exception (the loop's own ``error`` first) is raised at the end."""
    first = error
    for phase in END_PHASES:
        for cb in callbacks:
            if getattr(cb, "end_phase", "after") != phase:
                continue
            try:
                cb.on_train_end(state, reason)
            except BaseException as e:  # noqa: BLE001  (re-raised below, after every callback ran)
                if is_interrupt(e):
                    state.interrupted = True
                    log.warning("interrupted in %s at the end of training; the run is saved (%s)", type(cb).__name__, reason)
                else:
                    log.error("%s failed at the end of training: %s: %s", type(cb).__name__, type(e).__name__, e)
                first = first if first is not None else e
    if first is not None:
        raise first


def run_loop(
    state: RunState,
    terms: list[LossTerm],
    callbacks: list[Callback] = (),
    *,
    should_stop: Callable[[], bool] = lambda: False,
    noise_fn: NoiseFn = gaussian_noise,
    backward: Backward = sum_backward,
) -> str:
    """Train from ``state.step`` to ``state.total_steps``. Returns why it ended:
    ``"finished"``, ``"stopped"`` (should_stop or a callback). An interrupt (``is_interrupt``)
    ends as ``"stopped"`` and anything else as ``"error: ..."``; both are re-raised after
    the callbacks saved the last complete step (``end_training``)."""
    for cb in callbacks:
        cb.on_train_start(state)
    reason, error = "finished", None
    model_module = state.model.module
    model_module.train()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            while state.step < state.total_steps:
                t0 = time.perf_counter()
                for cb in callbacks:
                    cb.on_step_start(state)
                logs = train_step(state, terms, noise_fn, backward)
                logs["seconds"] = time.perf_counter() - t0
                state.history.append({k: logs[k] for k in ("step", "loss", "lr", "seconds", "terms")})
                for cb in callbacks:
                    cb.on_step_end(state, logs)
                if should_stop():
                    reason = "stopped"
                    break
    except StopTraining as stop:
        reason = stop.reason
    except BaseException as e:  # noqa: BLE001  (saved, then re-raised by end_training)
        error = e
        state.interrupted = is_interrupt(e)
        reason = "stopped" if state.interrupted else f"error: {type(e).__name__}: {e}"
    finally:
        model_module.eval()
    end_training(state, callbacks, reason, error)
    return reason


