"""The minutes before step 1: phase and caching progress, and prompt embeddings cached with
the captions (an encoder spy counts every text the encoder sees)."""
from __future__ import annotations

import logging
import math

import pytest
from tiny_run import SIZE, make_config, one_thread, tiny_model, write_data  # noqa: F401 (fixture)

from trainer_core.demo.codec import DctCodec
from trainer_core.demo.dataset import write_demo_dataset
from trainer_core.demo.text import HashTextEncoder
from trainer_core.phases import PHASES, PhaseReporter, describe
from trainer_core.previews import PreviewCallback, demo_renderer, prompt_texts
from trainer_core.session import train_lora

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["sks, a red ring object", "a blue background"]


class SpyEncoder(HashTextEncoder):
    """The demo's text encoder, recording every text it encodes and the phase it ran in."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events
        self.calls: list[tuple[str, str]] = []

    def encode(self, texts):
        phase = self.events[-1][0] if self.events else None
        self.calls.extend((phase, t) for t in texts)
        return super().encode(texts)


def run(tmp_path, run_name: str, steps: int, events: list, *, previews: bool = True, **sections):
    """A tiny run with previews (demo renderer) every 2 steps; returns (result, spy)."""
    spy = SpyEncoder(events)
    config = make_config(tmp_path / "data", steps=steps, **sections)
    callbacks = [PreviewCallback(demo_renderer(DctCodec(), spy, PROMPTS, "sks", seed=1, steps=2, size=SIZE), 2)]
    result = train_lora(config, tiny_model(), DctCodec(), spy, run_dir=tmp_path / run_name,
                        callbacks=callbacks if previews else [],
                        prompts=prompt_texts(PROMPTS, "sks") if previews else (),
                        phase_progress=lambda *e: events.append(e))
    return result, spy


def test_caching_reports_counts_rate_and_eta_in_phase_order(tmp_path):
    write_demo_dataset(tmp_path / "data", size=SIZE, count=6, mixed_sizes=False)  # one bucket, batches of 4
    events: list = []
    run(tmp_path, "run", 2, events, previews=False)
    images = [(n, t) for p, n, t, _ in events if p == "encoding images"]
    texts = [(n, t) for p, n, t, _ in events if p == "encoding captions"]
    assert images == [(0, 6), (4, 6), (6, 6)]
    total = texts[0][1]
    assert total > 0 and texts == [(0, total), (total, total)]  # one batch of <= 16 texts
    order = [p for p, *_ in events]
    first = {p: order.index(p) for p in dict.fromkeys(order)}
    assert list(first) == ["loading", "encoding images", "encoding captions", "training", "saving", "done"]
    assert order[-1] == "done" and set(order) <= set(PHASES)
    for phase, n, total, info in events:
        if phase.startswith("encoding") and n > 0:
            assert info["rate"] > 0 and info["eta"] >= 0
            assert n < total or info["eta"] == 0

    events.clear()  # a second run over the same data: everything cached, the phases still say so
    run(tmp_path, "run2", 1, events, previews=False, data={"cache_dir": str(tmp_path / "run" / ".latent_cache")})
    assert [(p, n, t) for p, n, t, _ in events if p.startswith("encoding")] == [
        ("encoding images", 0, 0), ("encoding captions", 0, 0)]


def test_previews_and_saves_interrupt_training_and_return_to_it(tmp_path):
    write_data(tmp_path / "data", count=2)
    events: list = []
    run(tmp_path, "run", 3, events)
    order = [p for p, *_ in events]
    start = order.index("training")
    # baseline preview at the start, step 2's preview, then the end: final LoRA, final checkpoint, and only
    # then the final preview (saving never waits on, or depends on, a preview)
    assert order[start:] == ["training", "previews", "training", "previews", "training",
                             "saving", "training", "saving", "training", "previews", "training", "done"]


def test_prompts_are_encoded_once_with_the_captions_and_never_again(tmp_path, caplog):
    write_data(tmp_path / "data", count=2)
    events: list = []
    texts = prompt_texts(PROMPTS, "sks")
    assert texts == ["sks, a red ring object", "a red ring object", "sks, a blue background", "a blue background", ""]
    _, spy = run(tmp_path, "run", 2, events)
    encoded = [t for _, t in spy.calls]
    assert set(texts) <= set(encoded) and len(encoded) == len(set(encoded))  # each text once
    assert {p for p, _ in spy.calls} == {"encoding captions"}  # none while previews rendered

    events.clear()  # resume (more steps, same run folder): nothing is encoded at all
    with caplog.at_level(logging.INFO, logger="trainer_core"):
        result, spy = run(tmp_path, "run", 4, events)
    assert result.steps == 4 and spy.calls == []
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text encodes saved")]
    assert saved == [f"text encodes saved by the cache: {len(encoded)} ({len(encoded) - 5} caption texts, 5 prompts)"]

    # re-queue as a new run sharing the cache (data.cache_dir): nothing encoded either
    _, spy = run(tmp_path, "again", 2, events, data={"cache_dir": str(tmp_path / "run" / ".latent_cache")})
    assert spy.calls == []


def test_reporter_rate_eta_and_log_lines(caplog):
    clock = iter([0.0, 2.0, 4.0, 4.0]).__next__
    seen: list = []
    reporter = PhaseReporter(lambda *e: seen.append(e), clock=clock)
    with caplog.at_level(logging.INFO, logger="trainer_core.phases"):
        reporter("encoding images", 0, 8)
        reporter("encoding images", 4, 8)
        reporter("encoding images", 8, 8)
    assert [(n, i["rate"], i["eta"]) for _, n, _, i in seen] == [(0, None, None), (4, 2.0, 2.0), (8, 2.0, 0.0)]
    assert [r.getMessage() for r in caplog.records] == [
        "encoding images 0/8", "encoding images 8/8 (2.0/s, ETA 0s)"]  # start and end (no 10 s passed)
    assert describe({"rate": 0.25, "eta": 12.0}) == " (4.0s each, ETA 12s)"
    assert math.isclose(seen[1][3]["rate"], 2.0)
    with pytest.raises(ValueError, match="unknown phase 'encoding'.*loading"):
        reporter("encoding")


def test_step_rate_leaves_out_the_time_paused():
    from trainer_core.phases import StepRate

    now = [0.0]
    reporter = PhaseReporter(clock=lambda: now[0])
    rate = StepRate(window=3, clock=lambda: now[0])
    reporter("training")
    now[0] = 2.0
    assert rate(1, 10, reporter.paused_s, first_s=1.5) == (1.5, 13.5)  # one step: its own duration
    reporter("paused")
    now[0] = 100.0
    assert reporter.paused_s == 98.0
    reporter("training")
    now[0] = 102.0
    assert rate(2, 10, reporter.paused_s) == (2.0, 16.0)  # 100 s, 98 of them paused
    for step in (3, 4, 5):
        now[0] += 1.0
        per_step, eta = rate(step, 10, reporter.paused_s)
    assert (per_step, eta) == (1.0, 5.0)  # the window forgets the slower first steps


def test_durations_and_step_timing_read_like_a_clock():
    from trainer_core.phases import duration, step_timing

    assert [duration(x) for x in (0.4, 59.6, 95, 3599, 4000, 90061)] == ["0s", "1m00s", "1m35s", "59m59s", "1h06m", "25h01m"]
    assert step_timing(0.42, 97 * 0.42) == "2.38it/s, ETA 41s"
    assert step_timing(3.5, 343.0) == "3.50s/it, ETA 5m43s"
    assert step_timing(None, None) == "" and step_timing(2.0, None) == "2.00s/it"
