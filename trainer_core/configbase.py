"""Config machinery: fields with help text and ranges, validation, dict round trips."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Callable, Optional


def opt(default: Any, help: str, *, lo=None, hi=None, lo_open=False, choices=None) -> Any:
    """A config field with help text, an optional numeric range and named choices.

    ``choices`` is a zero-argument callable returning the allowed names (a registry's
    ``names``), so registries can grow without touching this file.
    """
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names the field and the fix."""


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            continue  # nested configs validate themselves
        choices: Optional[Callable[[], list[str]]] = meta.get("choices")
        if choices is not None and value not in choices():
            raise ConfigError(f"{name}={value!r} is not a known choice; use one of: {', '.join(choices())}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is None and hi is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise ConfigError(f"{name} must list at least one value")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name}={value!r} must be a number")
            too_low = lo is not None and (v <= lo if meta.get("lo_open") else v < lo)
            if too_low or (hi is not None and v > hi):
                low = "-inf" if lo is None else lo
                high = "inf" if hi is None else hi
                bracket = "(" if meta.get("lo_open") else "["
                raise ConfigError(f"{name}={value!r} is out of range; allowed {bracket}{low}, {high}]")


class _Validated:
    _prefix = ""

    def __post_init__(self) -> None:
        _check_fields(self, self._prefix)
        self.check()

    def check(self) -> None:
        """Cross-field rules; subclasses override."""


def _names(module: str, registry: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        import importlib

        return getattr(importlib.import_module(f"trainer_core.{module}"), registry).names()

    return names



def _build(cls: type, d: dict, prefix: str) -> Any:
    """Build a dataclass from a dict, failing on unknown keys (a typo must not pass)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _build(type(sub), value, f"{prefix}.{name}" if prefix else name)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def field_help(cls: type, name: str) -> str:
    """The help text of ``cls.name``, for node tooltips and CLI help."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)
