"""Typed construction of dataclasses from plain dicts (parsed YAML), dotted overrides, and the
reverse (dataclass -> plain dict), with errors that name the dotted key and the fix.

Fields whose metadata holds a ``registry`` are polymorphic components: ``{name: ppo_clip,
eps_high: 0.28}`` or just ``ppo_clip`` builds ``registry.get("ppo_clip")(eps_high=0.28)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


def path_field(default: str | None = "") -> Any:
    """A dataclass field holding a path (resolved against the recipe's directory on load)."""
    return dataclasses.field(default=default, metadata={"path": True})


def paths_field() -> Any:
    """A dataclass field holding a list of paths."""
    return dataclasses.field(default_factory=list, metadata={"path": True})


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


def _where(path: str) -> str:
    return path or "<top level>"


def unknown_key_error(key: str, valid: list[str], parent: str) -> ConfigError:
    full = f"{parent}.{key}" if parent else key
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    did_you_mean = f" (did you mean {((parent + '.') if parent else '') + hint[0]!r}?)" if hint else ""
    if not valid:
        fix = ""
        if parent.startswith("algo"):
            # typically a recipe's algo settings left over after a preset change on the command line
            fix = "; to switch algorithm replace the whole block, e.g. 'algo={preset: grpo}'"
        return ConfigError(f"unknown key {full!r}: {_where(parent)!r} takes no keys{fix}")
    return ConfigError(
        f"unknown key {full!r}{did_you_mean}; valid keys under {_where(parent)!r}: {', '.join(valid)}"
    )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def convert(value: Any, tp: Any, path: str, registry: Any = None) -> Any:
    """Check and convert ``value`` to type ``tp``; ``path`` is the dotted key for error messages."""
    if registry is not None:
        return build_component(value, registry, path)
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    tp = inner
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, path)
    if origin is Literal:
        return _literal(value, typing.get_args(tp), path)
    if origin in (list, tuple):
        return _sequence(value, tp, origin, path)
    if origin is dict:
        return _mapping(value, tp, path)
    return _scalar(value, tp, path)


def _literal(value: Any, choices: tuple, path: str) -> Any:
    if value in choices:
        return value
    hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(
        f"{path}: {value!r} is not allowed{did_you_mean}; choose one of {', '.join(map(repr, choices))}"
    )


def _sequence(value: Any, tp: Any, origin: Any, path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    args = typing.get_args(tp)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _mapping(value: Any, tp: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
    key_tp, val_tp = typing.get_args(tp) or (str, Any)
    return {convert(k, key_tp, path): convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{path}: unsupported config field type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_where(path)}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(str(key), sorted(fields), path)
        sub = f"{path}.{key}" if path else key
        kwargs[key] = convert(value, hints[key], sub, fields[key].metadata.get("registry"))
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{_where(path)}: {e}") from None


def build_component(value: Any, registry: Any, path: str) -> Any:
    if isinstance(value, str):
        value = {"name": value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(
            f"{path}: expected {{name: <{registry.family}>, ...parameters}}, got {value!r}; "
            f"valid names: {', '.join(registry.names())}"
        )
    params = dict(value)
    name = params.pop("name")
    try:
        cls = registry.get(name)
    except ValueError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    return build(cls, params, path)


# ---- dumping ------------------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (components keep their ``name``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        if hasattr(type(obj), "name") and isinstance(getattr(type(obj), "name", None), str):
            out["name"] = obj.name
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = to_plain(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


# ---- dicts, files, overrides ---------------------------------------------------------------------


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``. A component mapping whose ``name`` changes replaces the old one."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        same_kind = (
            isinstance(old, dict)
            and isinstance(value, dict)
            and value.get("name", old.get("name")) == old.get("name")
        )
        out[key] = deep_merge(old, value) if same_kind else value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    _check_keys(data, str(path), "")
    return data


def _check_keys(node: Any, source: str, parent: str) -> None:
    """YAML 1.1 reads unquoted on/off/yes/no as booleans and 1, 2 as ints; keys must be strings."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_keys(item, source, f"{parent}[{i}]")
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{source}: a key under {_where(parent)!r} was read as the {type(key).__name__} {key!r} "
                "(YAML reads unquoted on/off/yes/no/true/false as booleans); quote the key"
            )
        _check_keys(value, source, f"{parent}.{key}" if parent else key)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``algo.gate.gamma=2`` -> (["algo", "gate", "gamma"], 2); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. algo.gate.gamma=2")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_dotted(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and i < len(parts) - 1:
            child = node[part] = {"name": child}  # component shorthand being refined
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def has_dotted(data: dict, parts: list[str]) -> bool:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
