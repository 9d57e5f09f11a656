"""Name -> class registries for the estimator components.

Every entry of one registry has the same call signature. Components are frozen dataclasses with a
``name`` class attribute; configs refer to them as ``{name: ppo_clip, eps_high: 0.28}``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str):
        self.family = family
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes:
            raise ValueError(f"duplicate {self.family} registration: {name!r}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            hint = difflib.get_close_matches(name, self.names(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"unknown {self.family} {name!r}{did_you_mean}; valid {self.family} names: {', '.join(self.names())}"
            )
        return self._classes[name]

    def build(self, name: str, **params: Any) -> T:
        cls = self.get(name)
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(params) - fields)
        if unknown:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise ValueError(
                f"{self.family} {name!r} has no parameter {unknown[0]!r}; its parameters: {valid}"
            )
        return cls(**params)


def describe(component: Any) -> str:
    """Short human form, e.g. ``ppo_clip(eps_low=0.2, eps_high=0.28)``."""
    params = ", ".join(f"{f.name}={_fmt(getattr(component, f.name))}" for f in dataclasses.fields(component))
    return f"{component.name}({params})" if params else component.name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)
