"""Helpers shared by the typed config dataclasses: strict construction from dicts."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from llm_cxr.errors import ConfigError

T = TypeVar("T")


def from_dict_strict(cls: type[T], d: dict[str, Any], what: str, source: str = "config") -> T:
    """``cls(**d)``, but an unknown key is a :class:`ConfigError` naming it, the source and the known keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a {what} config must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} keys {unknown}; known: {sorted(known)}")
    return cls(**d)
