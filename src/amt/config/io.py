"""Reading and writing configurations: presets (YAML) → :class:`~amt.config.sections.ExperimentConfig`, nested
``--set`` overrides applied on top of each field's default, values checked with errors that name the key and the
fix, and the resolved configuration as YAML."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from amt.config.sections import VARIANTS, ExperimentConfig


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses and tuples.

    A partial mapping for a nested dataclass field applies on top of that field's default (so
    ``pool.attack.steps=5`` keeps the other fields of ``PoolConfig.attack``'s default, not ``AttackConfig()``'s).
    """
    if dataclasses.is_dataclass(cls):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{where or 'config'}: unknown key(s) {unknown} for {cls.__name__}; valid keys are {list(fields)}"
            )
        kwargs = {}
        for k, v in data.items():
            default = _field_default(fields[k])
            if isinstance(v, dict) and dataclasses.is_dataclass(default):
                v = merge_dicts(to_dict(default), v)
            kwargs[k] = _build(hints[k], v, f"{where}.{k}" if where else k)
        return cls(**kwargs)
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin is Literal:
        if type(data) not in {type(a) for a in args} or data not in args:
            hint = RENAMED.get(data, "") if isinstance(data, str) else ""
            raise ConfigError(f"{where}: {data!r} is not one of {list(args)}{hint}")
        return data
    if origin is typing.Union or (origin is not None and type(None) in args):
        if data is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], data, where)
    if origin is tuple:
        if not isinstance(data, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {data!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(data)!r}")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if cls is float:  # numbers, numeric text ("1e-4", which YAML leaves a string) and fractions ("4/255")
        try:
            if isinstance(data, str) and data.count("/") == 1:
                num, den = data.split("/")
                return float(num) / float(den)
            if not isinstance(data, bool):
                return float(data)
        except (TypeError, ValueError, ZeroDivisionError):
            pass
        raise ConfigError(f"{where}: expected a number, got {data!r} (e.g. 0.0157, 1e-4 or 4/255)")
    if cls in (int, str, bool) and not isinstance(data, cls):
        raise ConfigError(f"{where}: expected {cls.__name__}, got {data!r}")
    if cls is int and isinstance(data, bool):
        raise ConfigError(f"{where}: expected int, got {data!r}")
    return data


RENAMED = {"amt": " (the merge rule 'amt' is now called 'ttm': test-time merging)"}  # hints for renamed choices


def from_dict(cls: type, data: dict) -> Any:
    """Build config dataclass ``cls`` from a (possibly partial) nested mapping."""
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def variant_overrides(name: str) -> dict:
    """The overrides of meta-tuning variant ``name`` (see :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


EXTENDS = "extends"  # a preset's key naming the preset it builds on (a path relative to its own folder)


def read_preset(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML preset's sections as a mapping. A preset with ``extends: BASE.yaml`` is BASE's mapping with its own
    sections merged over it (:func:`merge_dicts`: mappings merge key by key, anything else replaces); BASE may
    extend another preset in turn, and a cycle is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets live in configs/ (e.g. configs/embedded.yaml)")
    if path.resolve() in _chain:
        raise ConfigError(f"presets extend each other in a cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop(EXTENDS, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `{EXTENDS}` must be the path of another preset (relative to {path.parent}), "
                          f"got {base!r}")
    return merge_dicts(read_preset(path.parent / base, (*_chain, path.resolve())), data)


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read a YAML preset (and the presets it extends) into an :class:`ExperimentConfig`, then apply nested
    ``overrides``."""
    data = read_preset(path)
    if overrides:
        data = merge_dicts(data, overrides)
    return from_dict(ExperimentConfig, data)


def merge_dicts(base: dict, new: dict) -> dict:
    """Recursively merge ``new`` into a copy of ``base``."""
    out = dict(base)
    for k, v in new.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """Turn ``"eval.n_tasks=50"`` into ``{"eval": {"n_tasks": 50}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. eval.n_tasks=50)")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def to_yaml(cfg: Any) -> str:
    """The configuration as YAML text (written next to results by :func:`amt.rundir.save_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
