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


def read_yaml_config(path) -> dict[str, Any]:
    """A training config file as a dict; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"training config {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e


def run_versions(*packages: str) -> dict[str, str]:
    """Library versions and the git commit, recorded in every run folder."""
    import importlib.metadata
    import subprocess
    from pathlib import Path

    from llm_cxr import __version__

    v = {"llm_cxr": __version__}
    for name in ("torch", "accelerate", "datasets", *packages):
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        v["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v
