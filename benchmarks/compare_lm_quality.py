"""Two or more measurements of bench_lm_quality.py side by side (e.g. LoRA against full fine-tuning).

    python benchmarks/compare_lm_quality.py full=lm_quality_retrain_1207 lora=lm_quality_lora \
        --name lm_quality_lora_vs_full

Each ARM=NAME reads results/NAME.json and results/NAME_model.json (what bench_lm_quality.py wrote for the run it
measured) and becomes one row: the quality metrics against their targets, then what its stages cost (minutes
summed, the largest peak memory, the trainable share of the weights). Nothing is re-measured here.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, write_results

QUALITY = [("report micro-F1", "report_clinical_micro_f1"), ("laterality", "report_laterality_accuracy"),
           ("VQA yes/no+side", "vqa_accuracy"), ("VQA, LM alone", "vqa_accuracy_unguided"),
           ("checklist micro-F1", "checklist_micro_f1"), ("image micro-F1 (one draw)", "image_finding_micro_f1"),
           ("valid images", "valid_image_rate"), ("image Frechet", "image_frechet")]


def read(name: str) -> tuple[dict, dict]:
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}_model.json"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"no results of bench_lm_quality.py named {name!r}: missing {', '.join(missing)}")
    out = []
    for p in paths:
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{p}: not readable JSON ({e})") from None
    return out[0], out[1]


def arm_row(arm: str, name: str) -> tuple[dict, list[dict]]:
    bench, model = read(name)
    s = model.get("summary", {})
    row = {"arm": arm, **{label: s.get(key) for label, key in QUALITY}}
    row["image micro-F1 (best of 4)"] = bench.get("runs", {}).get("model", {}).get("image_finding_micro_f1_best_of_4")
    stages = [c for c in bench.get("costs", []) if "trainable" in c]  # the multimodal stages (not the base LM)
    row["stages timed"] = len(stages)
    row["stage minutes"] = sum(c["minutes"] for c in stages) if stages else None
    row["peak RSS MB"] = max((c.get("peak_rss_mb") or 0 for c in stages), default=None)
    row["trainable share"] = max((c.get("share") or 0 for c in stages), default=None)
    row["commit"] = bench.get("machine", {}).get("git_commit")
    costs = [{"arm": arm, **c} for c in stages]
    return row, costs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", nargs="+", metavar="ARM=NAME", help="a label and the results name it measured")
    ap.add_argument("--name", required=True, help="results name of the comparison")
    ap.add_argument("--notes", default="", help="a sentence under the title (how the arms differ)")
    args = ap.parse_args()
    rows, costs = [], []
    for a in args.arms:
        arm, sep, name = a.partition("=")
        if not sep or not arm or not name:
            raise SystemExit(f"expected ARM=NAME (e.g. lora=lm_quality_lora), got {a!r}")
        r, c = arm_row(arm, name)
        rows.append(r)
        costs.extend(c)
    targets = read(args.arms[0].partition("=")[2])[0].get("targets", {})
    notes = (args.notes + (" " if args.notes else "") +
             "Targets: " + ", ".join(f"{k} >= {v}" for k, v in targets.items()) + ".")
    write_results(args.name, "Multimodal LM quality, side by side", {"arms": rows, "costs": costs},
                  [("Quality on the test split, and what the stages cost", rows), ("Each stage", costs)],
                  notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
