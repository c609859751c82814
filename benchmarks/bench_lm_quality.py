"""Multimodal LM quality on the synthetic test split (issue: multimodal LLM).

    python benchmarks/bench_lm_quality.py --run runs/lm-small-s2 --data runs/synth-20k-codes \
        --classifier runs/classifier-eval [--stage1 runs/lm-small-s1 [--evaluate-stage1]] [--stage0 runs/lm-small-s0] \
        [--base runs/lm-base-small] [--n 200] [--guidance 1,2]

CXR -> report: clinical micro-F1 of the labeler on generated against ground-truth findings, and
laterality accuracy (targets 0.90 / 0.90). report -> CXR: the finding classifier on generated
images against the findings the report asked for (target micro-F1 0.80). VQA: accuracy on
held-out yes/no and laterality questions (target 0.90). Also: the training curves (from
metrics.csv, as an SVG) and what each run cost (minutes, peak memory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

TARGETS = {"report_clinical_micro_f1": 0.90, "report_laterality_accuracy": 0.90, "image_finding_micro_f1": 0.80,
           "vqa_accuracy": 0.90}


def curves_svg(runs: dict[str, Path], out: Path) -> None:
    """Loss and eval-loss against step for each run, one panel per run (plain SVG, no plotting library)."""
    import csv

    W, H, pad = 420, 220, 40
    panels = []
    for k, (name, run) in enumerate(runs.items()):
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        series = {"train loss": [(int(r["step"]), float(r["loss"])) for r in rows],
                  "eval loss": [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]],
                  "eval loss, image prompts": [(int(r["step"]), float(r["eval_loss_read"])) for r in rows
                                               if r.get("eval_loss_read")],
                  "same, images swapped": [(int(r["step"]), float(r["eval_loss_swapped"])) for r in rows
                                           if r.get("eval_loss_swapped")]}
        ymax = max(v for s in series.values() for _, v in s) * 1.05
        x0 = k * (W + 20)

        def xy(s, v):
            return x0 + pad + (s / max(steps)) * (W - 2 * pad), H - pad - (v / ymax) * (H - 2 * pad)

        g = [f'<text x="{x0 + pad}" y="16" font-size="13">{name}</text>',
             f'<line x1="{x0 + pad}" y1="{H - pad}" x2="{x0 + W - pad}" y2="{H - pad}" stroke="#888"/>',
             f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{H - pad}" stroke="#888"/>',
             f'<text x="{x0 + W - pad}" y="{H - pad + 16}" font-size="11" text-anchor="end">step {max(steps)}</text>',
             f'<text x="{x0 + 4}" y="{pad}" font-size="11">{ymax:.2f}</text>']
        for j, ((label, pts), color) in enumerate(zip(series.items(), ("#4a7ab5", "#d0543c", "#3a9a5b", "#9a6a3a"))):
            if pts:
                path = " ".join(f"{xy(s, v)[0]:.1f},{xy(s, v)[1]:.1f}" for s, v in pts)
                g.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
                g.append(f'<text x="{x0 + W - pad}" y="{pad + 14 * j}" font-size="11" '
                         f'fill="{color}" text-anchor="end">{label}</text>')
        panels.append("".join(g))
    width = len(runs) * (W + 20)
    out.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H}">'
                   + "".join(panels) + "</svg>\n")


def cost(run: Path) -> dict:
    out = {"run": run.name}
    if (run / "cost.json").exists():
        c = json.loads((run / "cost.json").read_text())
        out.update({"minutes": c.get("seconds_total", 0) / 60, "peak_rss_mb": c.get("peak_rss_mb")})
    elif (run / "metrics.csv").exists():
        last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")
        out["minutes"] = float(last[-1]) / 60
    if (run / "trainable.json").exists():
        t = json.loads((run / "trainable.json").read_text())
        out.update({"trainable": t["trainable"], "share": t["share"]})
    lines = (run / "metrics.csv").read_text().splitlines() if (run / "metrics.csv").exists() else []
    out["steps"] = int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the trained run to evaluate (e.g. stage 2)")
    ap.add_argument("--stage1", help="the stage-1 run (its curves and cost go into the table)")
    ap.add_argument("--evaluate-stage1", action="store_true",
                    help="evaluate the stage-1 run too, beside the final one (twice the time)")
    ap.add_argument("--base", help="the base-LM run (its cost goes into the table)")
    ap.add_argument("--stage0", help="the reading-stage run (its curves and cost go into the table)")
    ap.add_argument("--data", required=True, help="dataset with codes and ground-truth findings")
    ap.add_argument("--classifier", required=True, help="finding classifier that judges generated images")
    ap.add_argument("--n", type=int, default=200, help="test studies per direction")
    ap.add_argument("--guidance", default="run",
                    help="comma-separated guidance scales for report -> image; run: the run's own (else 1)")
    ap.add_argument("--candidates", default="",
                    help="comma-separated numbers of images drawn per report and reranked by the run's finding head "
                         "(measured beside the plain draw, for runs with a finding head)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--name", default="lm_quality")
    args = ap.parse_args()

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.evaluation.lm_eval import EvalConfig, evaluate_all, evaluate_images
    from llm_cxr.lm.generation import LLMCXR

    evaluated_stage1 = args.stage1 and args.evaluate_stage1
    runs = {"stage 2" if evaluated_stage1 else "model": Path(args.run)}
    if evaluated_stage1:
        runs = {"stage 1": Path(args.stage1), **runs}
    data: dict = {"targets": TARGETS, "n": args.n, "runs": {}}
    rows = []
    guidances = [None if g.strip() == "run" else float(g) for g in args.guidance.split(",")]
    for name, run in runs.items():
        model = LLMCXR.from_pretrained(run)
        scales = [model.guidance_scale(g) for g in guidances]  # None ("run"): this run's own
        res = evaluate_all(model, args.data, "test", args.classifier, n=args.n, guidance=scales[0],
                           batch_size=args.batch_size, progress=True,
                           out=RESULTS / f"{args.name}_{name.replace(' ', '')}.json")
        entry = {"summary": res["summary"], "report_per_class": res["reports"]["per_class"],
                 "vqa_by_kind": res["vqa"]["by_kind"], "report_examples": res["reports"]["examples"][:4],
                 "vqa_examples": res["vqa"]["examples"][:6]}
        for g in scales[1:]:
            ds = load_dataset(args.data, split="test")
            cfg = EvalConfig(n_images=args.n, batch_size=args.batch_size, guidance=g, progress=True)
            im = evaluate_images(model, ds, args.classifier, cfg)
            entry[f"image_finding_micro_f1_guidance_{g:g}"] = im["micro_f1"]
            for i, pic in enumerate(im["images"][:8]):
                pic.save(RESULTS / f"{args.name}_{name.replace(' ', '')}_g{g:g}_{i:02d}.png")
        ranked = [int(c) for c in args.candidates.split(",") if c.strip()] if model.finding_head is not None else []
        for c in ranked:
            ds = load_dataset(args.data, split="test")
            cfg = EvalConfig(n_images=args.n, batch_size=args.batch_size, guidance=scales[0], candidates=c,
                             progress=True)
            t0 = time.monotonic()
            im = evaluate_images(model, ds, args.classifier, cfg)
            entry[f"image_finding_micro_f1_best_of_{c}"] = im["micro_f1"]
            entry[f"image_frechet_best_of_{c}"] = im["frechet"]
            entry[f"images_per_minute_best_of_{c}"] = im["n"] / max(time.monotonic() - t0, 1e-9) * 60
            for i, pic in enumerate(im["images"][:8]):
                pic.save(RESULTS / f"{args.name}_{name.replace(' ', '')}_best{c}_{i:02d}.png")
        data["runs"][name] = entry
        s = res["summary"]
        row = {"run": name, "reports": ("checklist-guided" + (" (finding head)" if model.finding_head is not None
                                                                else "")) if s.get("report_guided") else "plain",
               "report micro-F1": s["report_clinical_micro_f1"],
               "laterality": s["report_laterality_accuracy"],
               "VQA yes/no+side": s["vqa_accuracy"] if not s.get("vqa_guided") else f"{s['vqa_accuracy']:.3f} (guided)",
               "VQA, LM alone": s["vqa_accuracy_unguided"] if s.get("vqa_guided") else s["vqa_accuracy"],
               "VQA all kinds": s["vqa_accuracy_all_kinds"], "checklist micro-F1": s.get("checklist_micro_f1"),
               "reading micro-F1 / sides": _pair(s.get("report_reading_micro_f1"),
                                                 s.get("report_reading_side_accuracy")),
               "writer given truth": s.get("report_writer_micro_f1_given_truth"),
               "image micro-F1 (one draw)": s.get("image_finding_micro_f1"),
               "guidance": scales[0],
               "valid images": s.get("valid_image_rate"),
               "image Frechet / floor": _pair(s.get("image_frechet"), s.get("image_frechet_floor"))}
        for g in scales[1:]:
            row[f"image micro-F1 (g={g:g})"] = entry[f"image_finding_micro_f1_guidance_{g:g}"]
        for c in ranked:
            row[f"image micro-F1 (best of {c})"] = entry[f"image_finding_micro_f1_best_of_{c}"]
        rows.append(row)
    svg = RESULTS / f"{args.name}_curves.svg"
    curve_runs = (({"base LM": Path(args.base)} if args.base else {}) |
                  ({"stage 0 (reading)": Path(args.stage0)} if args.stage0 else {}) |
                  ({"stage 1": Path(args.stage1)} if args.stage1 else {}) | runs)
    curves_svg(curve_runs, svg)
    for name, run in curve_runs.items():
        slug = name.split(" (")[0].replace(" ", "")
        shutil.copy(run / "metrics.csv", RESULTS / f"{args.name}_{slug}_metrics.csv")
    costs = [cost(r) for r in curve_runs.values()]
    data["costs"] = costs
    write_results(args.name, "Multimodal LM quality (synthetic test split)", data,
                  [(f"Quality on {args.n} test studies per direction (targets: report micro-F1 >= 0.90, "
                    "laterality >= 0.90, image micro-F1 >= 0.80, VQA >= 0.90)", rows),
                   ("What each run cost on this machine", costs)],
                  notes=f"Training curves: {svg.name}; per-run metrics CSVs beside it.")
    print(json.dumps({k: v["summary"] for k, v in data["runs"].items()}, indent=2))
    return 0


def _pair(a, b) -> str | None:
    """Two shares in one cell ("0.93 / 0.99"), or None when the run does not have them."""
    if a is None:
        return None
    return f"{a:.2f} / {b:.2f}" if b is not None else f"{a:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
