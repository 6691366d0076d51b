"""Run-folder reports: ``learning_curve.svg`` and ``training_state.json``.

The SVG is written by hand (no plotting dependency): one polyline per series, the raw
loss faint and its moving average bold, plus optional extra series (validation loss).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_write_text

_COLOURS = ("#9db4d6", "#1f4e9c", "#d9822b", "#2a9d4b", "#9c2a8f")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def learning_curve_svg(series: dict[str, Sequence[tuple[float, float]]], *, title: str = "loss",
                       width: int = 720, height: int = 360) -> str:
    """An SVG line chart. ``series``: name → [(step, value)], drawn in order (first faint)."""
    points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    left, right, top, bottom = 60, 20, 30, 40
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">{title}</text>']
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
        sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
        sy = lambda y: top + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
        for t in _ticks(y0, y1):
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
        for t in _ticks(x0, x1):
            out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:.0f}</text>')
        out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">step</text>')
        for i, (name, s) in enumerate(series.items()):
            pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if math.isfinite(y))
            colour = _COLOURS[i % len(_COLOURS)]
            stroke = 1 if i == 0 else 2
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke}" points="{pts}"/>')
            out.append(f'<text x="{left + pw - 4}" y="{top + 14 * (i + 1)}" text-anchor="end" fill="{colour}">{name}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append("</svg>")
    return "\n".join(out)


def moving_average(values: Sequence[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_learning_curve(path: Path, history: list[dict], extra: dict[str, list[tuple[float, float]]] | None = None) -> None:
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    series = {"loss": list(zip(steps, losses)),
              "moving average": list(zip(steps, moving_average(losses)))}
    series.update(extra or {})
    atomic_write_text(path, learning_curve_svg(series, title="training loss"))


def write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state, indent=1, sort_keys=True, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
