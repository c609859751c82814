"""Cached pipeline stages: run a step once, reuse its output while its inputs are unchanged.

A stage's output lives in ``cache/NAME/`` with a ``stage.json`` recording the fingerprint
(its config, the llm-cxr version and a hash of the source code it depends on). A stage is
built in a temporary folder and renamed into place when complete, so an interrupted run
never leaves a half-made stage that a later run would trust.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from llm_cxr import __version__

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def code_hash(*modules: ModuleType) -> str:
    """A short hash of the source of ``modules`` (a package: all its files): a stage reruns when its code changes."""
    h = hashlib.sha256()
    for m in modules:
        root = Path(m.__file__).parent
        files = sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]) if hasattr(m, "__path__") else None
        if files:
            for f in files:
                h.update(f.read_bytes())
            continue
        try:
            h.update(inspect.getsource(m).encode())
        except (OSError, TypeError):
            h.update(m.__name__.encode())
    return h.hexdigest()[:16]


def _repoint(folder: Path, tmp: Path) -> None:
    """What a stage built may record absolute paths into its build folder (a run's ``run.json`` names its base
    model): after the move, JSON files under ``folder`` name the final place instead of a folder that is gone."""
    old, new = str(tmp.resolve()), str(folder.resolve())

    def fix(x):
        if isinstance(x, str) and (x == old or x.startswith(old + os.sep)):
            return new + x[len(old):]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    for path in folder.rglob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        fixed = fix(doc)
        if fixed != doc:
            path.write_text(json.dumps(fixed, indent=2) + "\n")


@dataclass
class StageResult:
    name: str
    path: Path
    cached: bool
    seconds: float  # this run's (0 when cached)
    info: dict[str, Any] = field(default_factory=dict)
    built_seconds: float = 0.0  # what building it cost, kept from the run that built it
    key: str = ""  # a hash of its fingerprint: what a stage built from this one puts in its own fingerprint


class Stages:
    """Runs named stages under ``root``; ``fresh=True`` ignores what is cached."""

    def __init__(self, root: Path, fresh: bool = False) -> None:
        self.root = Path(root)
        self.fresh = fresh
        self.results: dict[str, StageResult] = {}

    def run(self, name: str, fingerprint: dict[str, Any],
            build: Callable[[Path], dict[str, Any] | None]) -> StageResult:
        """Return stage ``name``, building it with ``build(tmp_dir) -> info`` unless cached."""
        folder = self.root / name
        fp = {"llm_cxr": __version__, **fingerprint}
        key = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = folder / STAGE_FILE
        if not self.fresh and marker.exists():
            try:
                saved = json.loads(marker.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("fingerprint") == fp:
                log.info("stage %s: cached (%s)", name, folder)
                res = StageResult(name, folder, True, 0.0, saved.get("info", {}), float(saved.get("seconds") or 0.0),
                                  key)
                self.results[name] = res
                return res
        log.info("stage %s: running", name)
        tmp = self.root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        info = build(tmp) or {}
        seconds = time.perf_counter() - t0
        (tmp / STAGE_FILE).write_text(json.dumps({"fingerprint": fp, "info": info, "seconds": seconds},
                                                 indent=2, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        _repoint(folder, tmp)
        res = StageResult(name, folder, False, seconds, info, seconds, key)
        self.results[name] = res
        log.info("stage %s: done in %.1f s", name, seconds)
        return res

    def key(self, name: str) -> str:
        """What a later stage's fingerprint holds of stage ``name`` (already run): the hash of its fingerprint,
        so that anything that rebuilt it (its config, its code, a stage before it) rebuilds the later one too.
        Its ``info`` (measured numbers) would not do: a retrained VQ-GAN can encode a dataset of the same size."""
        return self.results[name].key

    def timings(self) -> dict[str, dict[str, Any]]:
        """Per stage: cached or not, this run's seconds, and the seconds its build took (kept when cached)."""
        return {n: {"cached": r.cached, "seconds": round(r.seconds, 2), "built_seconds": round(r.built_seconds, 2)}
                for n, r in self.results.items()}
