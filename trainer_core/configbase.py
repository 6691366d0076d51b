"""Config machinery: fields with help text and ranges, validation, dict round trips."""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
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


# annotation (a string: config modules use ``from __future__ import annotations``) → (test, wording)
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number (int)"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number (float)"),
    "bool": (lambda v: isinstance(v, bool), "true or false (bool)"),
    "str": (lambda v: isinstance(v, str), "text (str)"),
}
_GENERIC_EXAMPLES = {"int": 1, "float": 0.5, "bool": True, "str": "text"}
_TUPLE = re.compile(r"^tuple\[(\w+), \.\.\.\]$")


def _example(kind: str, default: Any, is_tuple: bool) -> str:
    if is_tuple:
        return json.dumps(list(default) if default else [_GENERIC_EXAMPLES[kind]] * 2)
    return json.dumps(default if kind != "str" or default else _GENERIC_EXAMPLES["str"])


def _type_error(name: str, value: Any, annotation: Any, default: Any) -> Optional[str]:
    """A message when ``value`` does not have the field's type (None when it does or the
    annotation is not one of the config types)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    match = _TUPLE.match(text)
    kind = match.group(1) if match else text
    if kind not in _TYPES:
        return None
    test, words = _TYPES[kind]
    example = f"e.g. {name}={_example(kind, default, bool(match))}"
    if match and not isinstance(value, tuple):
        return f"{name}={value!r} must be a list of {words.split(' (')[0].removeprefix('a ')}s ({text}), {example}"
    items = value if match else (value,)
    bad = [v for v in items if not test(v)]
    if not bad:
        return None
    what = f"a list whose items are each {words}" if match else words
    return f"{name}={value!r} must be {what}, not {type(bad[0]).__name__} {bad[0]!r}; {example}"


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            continue  # nested configs validate themselves
        wrong_type = _type_error(name, value, f.type, f.default)
        if wrong_type:
            raise ConfigError(wrong_type)
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



def field_names(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of the config tree ``cls`` (e.g. ``optim.lr``)."""
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        name = f"{prefix}{f.name}"
        out += field_names(type(sub), name + ".") if dataclasses.is_dataclass(sub) else [name]
    return out


# names users bring from the Trainer node's widgets or other trainers → the config's field name
_SYNONYMS = {"learning_rate": "lr", "gradient_accumulation": "grad_accum", "loss_weighting": "weighting",
             "resolution": "resolutions", "max_train_steps": "steps", "network_dim": "rank", "network_alpha": "alpha"}


def suggest(key: str, names: list[str]) -> str:
    """" (did you mean optim.lr?)" for a mistyped dotted ``key``: fields of the same name
    in any section first, else close matches; "" when nothing is close."""
    leaf = key.rsplit(".", 1)[-1]
    leaf = _SYNONYMS.get(leaf, leaf)
    names = list(names) + sorted({n.rsplit(".", 1)[0] for n in names if "." in n})  # sections too
    closeness = lambda n: -difflib.SequenceMatcher(None, key, n).ratio()  # noqa: E731
    same = sorted((n for n in names if n.rsplit(".", 1)[-1] == leaf), key=closeness)
    close = same or difflib.get_close_matches(key, names, n=3, cutoff=0.6) or [
        n for n in names if n.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [m.rsplit(".", 1)[-1] for m in names], n=3, cutoff=0.75)]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def with_user_names(error: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """``error`` led by what the user typed for the config fields it mentions: ``names``
    maps a dotted field to the user's name for it (``{"train.output_name": "--name"}`` turns
    "train.output_name='a/b' must ..." into "--name: train.output_name='a/b' must ...")."""
    text = str(error)
    users = [user for dotted, user in names.items() if re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", text)]
    return ConfigError(f"{', '.join(dict.fromkeys(users))}: {text}") if users else error


def _build(cls: type, d: dict, prefix: str, root: Optional[type] = None) -> Any:
    """Build a dataclass from a dict, failing on unknown keys (a typo must not pass)."""
    root = root or cls
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a section (a JSON object), not {d!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        where = prefix or "config"
        hints = "".join(suggest(f"{prefix}.{k}" if prefix else k, field_names(root)) for k in sorted(unknown))
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {where}{hints}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(type(sub), value, f"{prefix}.{name}" if prefix else name, root)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def field_help(cls: type, name: str) -> str:
    """The help text of ``cls.name``, for node tooltips and CLI help."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)
