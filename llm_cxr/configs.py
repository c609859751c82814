"""Helpers shared by the typed config dataclasses: strict construction from dicts."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, TypeVar

from llm_cxr.errors import ConfigError

T = TypeVar("T")

# How report -> image sampling draws by default (the API, the CLI, the web app and the benchmark alike). Measured
# with the small preset (image-focus stage 2) on 600 validation studies, image finding micro-F1: temperature 0.85
# gave 0.680, 0.7 0.698, 0.55 0.727, 0.4 0.762, 0.25 0.760; and on 200 of them the Frechet distance from the same
# studies' reconstructions (floor 112: other studies' reconstructions) was 207 at 1.0, 186 at 0.85, 146 at 0.55,
# 143 at 0.4, 150 at 0.25. So 0.4 draws the findings asked for more surely and the images are no less realistic.
IMAGE_TEMPERATURE = 0.4
IMAGE_TOP_P = 0.95


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING) -> Any:
    """A config field with its help text: the config reference (docs/configuration.md) and ``--help`` read it."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def config_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of a config dataclass's fields, for references and ``--help``."""
    out = []
    for f in fields(cls):
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            made = f.default_factory()
            default = "see below" if is_dataclass(made) else repr(made)
        else:
            default = "required"
        out.append((f.name, str(f.type), default, f.metadata.get("help", "")))
    return out


def from_dict_strict(cls: type[T], d: dict[str, Any], what: str, source: str = "config") -> T:
    """``cls(**d)``, but an unknown key is a :class:`ConfigError` naming it, the source and the known keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a {what} config must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} keys {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    typed = {k: _typed(v, hints.get(k), f"{what} key {k!r}", source) for k, v in d.items()}
    try:
        return cls(**typed)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a check in the dataclass itself, on a value of the right shape
        raise ConfigError(f"{source}: invalid {what} config: {e}") from e


def _typed(value: Any, hint: Any, name: str, source: str) -> Any:
    """``value`` checked against a plain field type (int, float, bool, str, optionally ``| None``).

    YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string: a number field takes such a string as its number
    rather than failing deep inside training. Fields of other types are passed through unchecked."""
    # a nested block (stage:, loop:, lora:, model:), typed as the dataclass or ``dict | TheConfig [| None]``
    blocks = [a for a in ((hint,) if isinstance(hint, type) else typing.get_args(hint))
              if isinstance(a, type) and is_dataclass(a)]
    if blocks:
        if value is None and type(None) in typing.get_args(hint):
            return value
        if not isinstance(value, (dict, *blocks)):
            raise ConfigError(f"{source}: {name} must be a mapping of keys, got {_short(value)}")
        return value
    origin = typing.get_origin(hint)
    if origin in (list, tuple):  # list[int], tuple[int, ...]: a sequence whose items are checked one by one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {_short(value)}")
        item = next((a for a in typing.get_args(hint) if a is not Ellipsis), None)
        return type(value)(_typed(v, item, f"{name}[{i}]", source) for i, v in enumerate(value))
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{source}: {name} must be a mapping, got {_short(value)}")
    if origin is not None and origin is not typing.Union and origin is not types.UnionType:
        return value  # dict[...] and other generics: passed through
    args = typing.get_args(hint)
    optional = type(None) in args
    plain = [a for a in args if a is not type(None)] if args else [hint]
    if len(plain) != 1 or plain[0] not in (int, float, bool, str) or (value is None and optional):
        return value
    want = plain[0]
    if want in (bool, str):
        if isinstance(value, want):
            return value
    elif not isinstance(value, bool):  # a number field: never True/False (bool is an int in Python)
        if isinstance(value, int) and want is int:
            return value  # exactly, however large
        try:
            number = float(value)  # an int, a float, or a string such as "1e-4"
        except (TypeError, ValueError):
            number = None
        if number is not None and (want is float or number.is_integer()):
            return want(number)
    raise ConfigError(f"{source}: {name} must be {'an' if want is int else 'a'} {want.__name__}"
                      f"{' or null' if optional else ''}, got {_short(value)}")


def _short(value: Any) -> str:
    """A bounded repr for messages (a YAML value can be huge)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlist = r.maxdict = r.maxtuple = 4
    r.maxlevel = 2
    r.maxstring = r.maxother = 60
    return r.repr(value)


MAX_CONFIG_NODES = 100_000  # far beyond any real config; a YAML alias bomb expands to billions


def _expanded_size(node: Any, seen: dict[int, int]) -> int:
    """Nodes the tree would have with every alias expanded, counted without expanding (memoised by identity)."""
    if isinstance(node, dict):
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return 1
    key = id(node)
    if key not in seen:
        seen[key] = 0  # a cycle counts once
        seen[key] = min(1 + sum(_expanded_size(c, seen) for c in children), 10**12)
    return seen[key]


def read_yaml_config(path) -> dict[str, Any]:
    """A training config file as a dict; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"training config {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"training config {path} is not a file")
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file is a mapping of keys to values, got a {type(doc).__name__}")
    if _expanded_size(doc, {}) > MAX_CONFIG_NODES:
        raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_CONFIG_NODES:,} values (an alias bomb?)")
    return doc


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


ALLOW_UNFINISHED_ENV = "LLM_CXR_ALLOW_UNFINISHED"


def check_finished(folder, what: str) -> None:
    """Refuse a training run that stopped before its end (it has ``checkpoints/`` but no ``DONE``).

    A killed run's weights are those of its last save: usable, but not what its config promised, so using them
    takes an explicit ``--allow-unfinished`` (``LLM_CXR_ALLOW_UNFINISHED=1``), which only warns."""
    import json
    import logging
    import os
    from pathlib import Path

    folder = Path(folder)
    run = folder.parent if folder.name == "model" else folder
    if not (run / "checkpoints").is_dir() or (run / "DONE").exists():
        return
    at = ""
    try:
        saved = json.loads((run / "config.json").read_text())
        steps = (saved.get("train") or saved.get("loop") or saved).get("steps")
        at = f" of {steps} steps" if steps else ""
    except (OSError, ValueError, AttributeError):
        pass
    msg = (f"{run} is an unfinished {what} training run (no DONE marker: it stopped before the end{at}); rerun its "
           f"training command with the same --out to finish it, or pass --allow-unfinished to use it as it is")
    if os.environ.get(ALLOW_UNFINISHED_ENV) == "1":
        logging.getLogger(__name__).warning(msg)
        return
    raise ConfigError(msg)
