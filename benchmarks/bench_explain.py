"""Explanations measured (issue: explanations).

    python benchmarks/bench_explain.py [--repeats 3]                       # cost, on a small-preset-shaped model
    python benchmarks/bench_explain.py --run runs/lm-small-s2 --data runs/synth-20k-codes [--n 100]   # quality
    python benchmarks/bench_explain.py --tune --run runs/lm-small-s2 --data runs/synth-20k-codes --n 25  # M2IB's
        hyper-parameters on the validation split: pointing per bottleneck layer, then beta and IBA's normalisation

Quality: on the test split's focal findings (with the generator's masks) that the model's own report states, every
method explains the sentence that states each one; pointing game and mass in mask per finding, deletion / LeRF /
insertion areas through the pipeline as it runs, for M2IB and random (llm_cxr.explain.evaluate); ``--phrases``
explains the phrase naming each finding instead. Targets: M2IB pointing >= 0.80 and above every baseline; deletion
area at least 30% below random's.

Measured on a model of the `small` preset's shape (GPT-NeoX 256 x 6 blocks, 2,048 report tokens + 512 image codes,
a 16 x 16 grid, with position table, image reader and image plan): its weights are random, since cost does not depend
on them, so the benchmark runs anywhere without a trained run. Localisation and faithfulness need a trained run and
a dataset with masks (llm_cxr.explain.metrics).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPORT = ("FINDINGS: There is a small left pleural effusion with adjacent basal atelectasis. The cardiac silhouette "
          "is normal. No pneumothorax. IMPRESSION: Small left pleural effusion.")


def small_shaped_model(folder: Path):
    from llm_cxr.lm.addons.plan import ImagePlan
    from llm_cxr.lm.addons.positions import attach, find
    from llm_cxr.lm.addons.reader import CodeReader
    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.lm.prompts import PLAN_ITEMS
    from llm_cxr.lm.run import GuidedModes, RunInfo, load_run, save_model
    from llm_cxr.lm.tokens import add_image_tokens
    from llm_cxr.train.base import build_base_model, get_base_preset, train_text_tokenizer

    preset = get_base_preset("small")
    tok = train_text_tokenizer([REPORT] * 50, preset.vocab)
    model = build_base_model(preset, len(tok), seed=0)
    tmap = add_image_tokens(tok, model, 512, 16, "bench")
    attach(model, tmap, reader=CodeReader(torch.randn(512, 8), 16, preset.hidden, summary=True),
           plan=ImagePlan(PLAN_ITEMS, 256, preset.hidden))
    find(model).plan.maps.data.normal_()
    info = RunInfo(kind="full", base="random", vqgan=None, max_length=512, guided=GuidedModes(images=True, sides=True))
    return LLMCXR(load_run(save_model(model, tok, tmap, info, folder)), vqgan=None)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default=None)
    ap.add_argument("--run", help="a trained run: measure localisation and faithfulness instead of cost")
    ap.add_argument("--data", help="dataset with codes and masks (with --run)")
    ap.add_argument("--n", type=int, default=100, help="studies (with --run)")
    ap.add_argument("--split", default="test", help="the split (with --run; hyper-parameters are chosen on val)")
    ap.add_argument("--tune", action="store_true", help="choose M2IB's settings on the validation split (with --run)")
    ap.add_argument("--phrases", action="store_true", help="explain the phrase naming each finding, not the sentence "
                                                          "of the model's report that states it")
    ap.add_argument("--methods", help="comma-separated methods (default: all)")
    args = ap.parse_args()
    if args.tune:
        return tune(args)
    if args.run:
        return quality(args)

    from llm_cxr.explain import METHODS
    from llm_cxr.explain.cases import image_to_report, report_to_image

    model = small_shaped_model(Path(tempfile.mkdtemp()) / "run")
    codes = torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(0))
    sentence = image_to_report(model, codes, REPORT, (10, 80))  # one sentence of a report
    drawing = report_to_image(model, REPORT, codes)
    rows = []
    for name in sorted(METHODS):
        fn = METHODS[name]
        row = {"method": name,
               "image -> report, s per sentence": timed(lambda: fn(model.cxr, sentence), args.repeats)}
        row["report -> image, s per drawing"] = (None if name == "occlusion" else
                                                 timed(lambda: fn(model.cxr, drawing), args.repeats))
        rows.append(row)
        print(row, flush=True)
    naive = {"method": "m2ib, naive (every block at every step)",
             "image -> report, s per sentence": timed(lambda: METHODS["m2ib"](model.cxr, sentence, naive=True),
                                                      args.repeats),
             "report -> image, s per drawing": timed(lambda: METHODS["m2ib"](model.cxr, drawing, naive=True),
                                                     args.repeats)}
    rows.append(naive)
    fast = next(r for r in rows if r["method"] == "m2ib")
    per_sentence = naive["image -> report, s per sentence"] / fast["image -> report, s per sentence"]
    per_drawing = naive["report -> image, s per drawing"] / fast["report -> image, s per drawing"]
    notes = (f"M2IB defaults (block 0.75 of 6 = 4 (5th), beta 0.1, 10 steps x 10 samples). Computing the 4 blocks "
             f"below the bottleneck once: {per_sentence:.2f}x faster per sentence, {per_drawing:.2f}x per drawing. "
             f"Sequence lengths: {sentence.ids.shape[1]} tokens (image -> report), {drawing.ids.shape[1]} "
             f"(report -> image). Median of {args.repeats} after a warm-up; fp32 (this CPU has no fast bf16).")
    write_results(args.name or "explain_cost", "Cost of an explanation (small-preset shape)", {"rows": rows},
                  [("Seconds per explanation, each method", rows)], notes=notes)
    return 0


def quality(args) -> int:
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.explain import METHODS
    from llm_cxr.explain.evaluate import evaluate_drawings, evaluate_methods, reports_for, sanity
    from llm_cxr.lm.generation import LLMCXR

    if not args.data:
        raise SystemExit("--run needs --data (a dataset encoded by the run's VQ-GAN, with masks)")
    model = LLMCXR.from_pretrained(args.run)
    ds = load_dataset(args.data, split=args.split)
    rows = list(ds.select(range(min(args.n, len(ds)))))
    methods = args.methods.split(",") if args.methods else sorted(METHODS)
    reports = None if args.phrases else reports_for(model, rows, progress=True)  # written once, explained by all
    res = evaluate_methods(model, rows, {m: {} for m in methods}, progress=True, phrases=args.phrases,
                           reports=reports)
    table = [{"method": m, "pointing": r["pointing"], "mass in mask": r["mass_in_mask"],
              "deletion area": r.get("deletion_area"), "insertion area": r.get("insertion_area"),
              "deletion, LM route only": r.get("deletion_area_lm"),
              "confidence drop": r.get("confidence_drop"), "confidence increase": r.get("confidence_increase"),
              "s per explanation": r["seconds_per_explanation"]} for m, r in res["methods"].items()]
    findings = sorted({f for r in res["methods"].values() for f in r["per_finding"]})
    per = [{"finding": f, "n": next(r["per_finding"][f]["n"] for r in res["methods"].values() if f in r["per_finding"]),
            **{m: r["per_finding"].get(f, {}).get("pointing") for m, r in res["methods"].items()}} for f in findings]
    what = ("the phrase naming it" if args.phrases else
            f"the sentence of the model's report that states it ({res['stated']} of {res['findings']} stated)")
    blank = max((r.get("no_evidence") or 0) for r in res["methods"].values())
    notes = (f"Each focal finding with a mask is explained by {what}. Deletion and insertion re-score the target "
             "through the pipeline as it runs (a guided run's finding head re-reads the changed codes); areas are "
             "of the per-token probability rescaled between the all-neutral image (0) and the whole one (1); "
             f"{blank} targets whose whole image gives no evidence over a blank one are left out of them. "
             "\"LM route only\" holds the stated findings fixed.")
    data = {"image_to_report": res}
    tables = [(f"{res['targets']} focal findings of {len(rows)} {args.split} studies", table),
              ("Pointing game per finding", per)]

    def write() -> None:  # each part as soon as it is done: an interrupted run keeps what it measured
        write_results(args.name or "explain_quality", f"Explanations on the {args.split} split", data, tables,
                      notes=notes)

    write()
    checks = sanity(model, rows, n=8, reports=reports, progress=True)
    data["sanity"] = checks
    tables.append(("Sanity (Adebayo et al. 2018): rank correlation of M2IB's map with the trained model's",
                   checks["randomised"] + [{"randomised up to": "(none: another stated finding's sentence)",
                                            "targets": checks["other_target"]["pairs"],
                                            "rank correlation": checks["other_target"]["rank correlation"]}]))
    write()
    drawings = evaluate_drawings(model, rows, {m: {} for m in methods if m != "occlusion"},  # codes only
                                 progress=True)
    data["report_to_image"] = drawings
    tables.append(("Report -> image: the codes inside each finding's mask explained by the report's words",
                   [{"method": m, "targets": r["n"], "reports cut to max_length": r["cut"],
                     "mass on the finding's words": r["word_mass"], "their share of the words": r["chance"],
                     "a finding word on top": r["top_word"]} for m, r in drawings["methods"].items()]))
    write()
    return 0


def tune(args) -> int:
    """M2IB's settings chosen on the validation split by the pointing game (ties: mass in mask), on the sentences
    of the model's own reports: every bottleneck block at M2IB's published values (beta 0.1, lr 1, 10 steps of 10
    samples, alpha 5), then at the best block beta 0.01 and 1, IBA's feature normalisation, and the LM's route
    alone. For a run with a finding head, then the head route's bottleneck (``head_*``): M2IB's values, beta 1,
    and a smaller step for longer (lr 0.3, 30 steps) at beta 1, 3 and 10."""
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.explain.evaluate import evaluate_methods, reports_for
    from llm_cxr.explain.m2ib import M2IBSettings
    from llm_cxr.explain.tail import n_layers
    from llm_cxr.lm.generation import LLMCXR

    if not (args.run and args.data):
        raise SystemExit("--tune needs --run and --data")
    model = LLMCXR.from_pretrained(args.run)
    ds = load_dataset(args.data, split="val")
    rows = list(ds.select(range(min(args.n, len(ds)))))
    reports = reports_for(model, rows, progress=True)  # written once for every setting
    depth = n_layers(model.cxr.lm)
    curve = []
    published = {"head_beta": 0.1, "head_lr": 1.0, "head_steps": 10}

    def score(options: dict) -> dict:
        t0 = time.perf_counter()
        r = evaluate_methods(model, rows, {"m2ib": options}, faithfulness=(), progress=True, reports=reports)
        m = r["methods"]["m2ib"]
        row = {"layer": options.get("layer", M2IBSettings().block(depth)), "beta": options.get("beta", 0.1),
               "normalize": options.get("normalize", False), "routes": options.get("routes", "all"),
               "head": ", ".join(f"{k[5:]} {v}" for k, v in options.items() if k.startswith("head_")) or "default",
               "pointing": m["pointing"], "mass in mask": m["mass_in_mask"], "targets": r["targets"],
               "minutes": (time.perf_counter() - t0) / 60}
        print(row, flush=True)
        curve.append(row)
        return row

    key = lambda r: (r["pointing"], r["mass in mask"])  # noqa: E731
    layers = [score({"layer": k}) for k in range(depth)]
    best = max(layers, key=key)
    for extra in ({"beta": 0.01}, {"beta": 1.0}, {"normalize": True}, {"routes": "lm"}):
        score({"layer": best["layer"], **extra})
    chosen = max(curve[:depth + 3], key=key)  # routes: faithfulness decides
    head_rows = []
    if model.finding_head is not None and model.guided_reports:
        lm = {"layer": chosen["layer"], "beta": chosen["beta"], "normalize": chosen["normalize"]}
        for head in (published, {**published, "head_beta": 1.0},
                     *({"head_beta": b, "head_lr": 0.3, "head_steps": 30} for b in (1.0, 3.0, 10.0))):
            head_rows.append(score({**lm, **head}))
    head_best = max(head_rows, key=key) if head_rows else None
    notes = (f"{len(rows)} validation studies, {best['targets']} focal findings stated by the model's reports; "
             f"{depth} blocks. Best for the LM's route: block {chosen['layer']}, beta {chosen['beta']}, normalize "
             f"{chosen['normalize']} (pointing {chosen['pointing']:.3f})."
             + (f" Best for the finding head's route: {head_best['head']} (pointing {head_best['pointing']:.3f})."
                if head_best else ""))
    write_results(args.name or "explain_tuning", "M2IB's settings on the validation split",
                  {"curve": curve, "chosen": chosen, "chosen_head": head_best},
                  [("Pointing game and mass in mask per setting", curve)], notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
