"""Helpers shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        pass
    # a copy of the tree without .git (a GPU machine) names its commit in the environment
    info["git_commit"] = info.get("git_commit") or os.environ.get("LLM_CXR_COMMIT")
    return info


def md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first-seen order

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, data: dict[str, Any], tables: Sequence[tuple[str, Sequence[dict]]],
                  notes: str = "") -> None:
    """Write results/NAME.json (data + machine + command) and results/NAME.md (tables)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join([Path(sys.executable).name] + sys.argv), "machine": m, **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    gpu = f", {m['cuda']}" if m.get("cuda") else ""
    md = [f"## {title}", "", f"`{payload['command']}` · {payload['date']} · {m.get('cpu')} "
          f"({m.get('cpu_count')} cores){gpu}, torch {m.get('torch')}, commit {m.get('git_commit')}", ""]
    if notes:
        md += [notes, ""]
    for caption, rows in tables:
        if caption:
            md += [f"**{caption}**", ""]
        md += [md_table(rows), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
