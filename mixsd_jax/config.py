"""Config as data: frozen dataclasses built from YAML plus `key=value` overrides.

Every stage has a frozen dataclass config. `load(cls, path, overrides)` reads a YAML file (optional),
applies dotted overrides (`train.lr=1e-5`, values parsed as YAML scalars), and builds the dataclass,
rejecting unknown keys and values of the wrong type with a one-line error that names the key.
`fingerprint(cfg)` is a stable hash of the resolved config; stages store it next to their outputs
and refuse to resume or mix outputs whose fingerprint differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from mixsd_jax.errors import MixsdError

T = TypeVar("T")


def add_config_args(parser) -> None:
    """`--config FILE` plus trailing `key=value` overrides (see `load`), shared by every command."""
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MixsdError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise MixsdError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MixsdError(f"{path}: top level must be a mapping of keys to values")
    return data


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`a.b=1` strings -> nested dict. Values are YAML scalars/lists (`lambdas=[0,0.3]`)."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise MixsdError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise MixsdError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MixsdError(f"override {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return result


def merge(base: Mapping, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; returns the value converted to the declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MixsdError as exc:
                errors.append(str(exc))
        raise MixsdError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise MixsdError(f"config key {key!r}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise MixsdError(f"config key {key!r}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise MixsdError(f"config key {key!r}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MixsdError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise MixsdError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MixsdError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MixsdError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise MixsdError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise MixsdError(f"config key {key!r}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise MixsdError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MixsdError(
            f"unknown config key {prefix + str(unknown[0])!r} (known in this section: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise MixsdError(f"missing config key {prefix + missing[0]!r}")
    try:
        return cls(**kwargs)
    except MixsdError:
        raise
    except (TypeError, ValueError) as exc:
        raise MixsdError(f"config section {prefix.rstrip('.') or cls.__name__}: {exc}") from None


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping | None = None,
    flags: Mapping | None = None,
) -> T:
    """`base` < YAML file < `key=value` overrides < explicit command-line `flags`, validated into `cls`.

    `flags` maps config keys to values already typed by argparse; None values are ignored.
    """
    data: dict = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    data = merge(data, parse_overrides(overrides))
    data = merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    return from_dict(cls, data)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def fingerprint(cfg: Any, exclude: Iterable[str] = ()) -> str:
    """Stable 16-hex hash of the resolved config; dotted keys in `exclude` are left out."""
    data = to_dict(cfg)
    for dotted in exclude:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """For `__post_init__` validation: one-line error naming the key."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise MixsdError(f"config key {name!r}: {value} is outside [{lo}, {hi}]")
