"""Run every benchmark (benchmarks/bench_*.py) and collect their tables into benchmarks/README.md.

Each benchmark writes benchmarks/results/NAME.json and NAME.md; this script runs them one
after the other (or only those named on the command line) and rebuilds the index.
Benchmarks never fail CI on a timing: they measure and report.

    python benchmarks/run_all.py            # all
    python benchmarks/run_all.py synth      # just bench_synth.py
    python benchmarks/run_all.py --collect  # only rebuild the README from existing results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

HEADER = """# Benchmarks

Measured by the scripts in this folder (`python benchmarks/run_all.py`); each writes
`results/NAME.json` (all numbers, the command, the machine) and `results/NAME.md`
(the table below). Numbers are what was measured, on the machine named in each section.
"""


def collect() -> Path:
    parts = [HEADER]
    for md in sorted(RESULTS.glob("*.md")):
        if md.name[:1].isdigit():  # dated notes (history, one-off checks) are linked, not tables to collect
            continue
        parts.append(md.read_text().strip() + "\n")
    dated = sorted(m.name for m in RESULTS.glob("*.md") if m.name[:1].isdigit())
    if dated:
        parts.append("## Dated notes\n\n" + "".join(f"- [{n}](results/{n})\n" for n in dated))
    out = HERE / "README.md"
    out.write_text("\n".join(parts))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--collect", action="store_true", help="only rebuild README.md from results/")
    args = ap.parse_args()
    if not args.collect:
        scripts = sorted(HERE.glob("bench_*.py"))
        if args.names:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.names]
        for s in scripts:
            if s.stem == "bench_lm_gpu":  # two steps (pack here, measure on a GPU): see its docstring
                print(f"== {s.name}: skipped (run `python {s.relative_to(HERE.parent)} --help`)", flush=True)
                continue
            t0 = time.time()
            print(f"== {s.name}", flush=True)
            rc = subprocess.call([sys.executable, str(s)])
            print(f"== {s.name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
    print(collect())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
