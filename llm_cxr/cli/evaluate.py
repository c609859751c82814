"""``llm-cxr evaluate`` (a model on a held-out split, or any system's reports from a file) and ``llm-cxr baseline``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm_cxr.errors import InputError


def add_evaluate_commands(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model (reports, images, VQA) or any system's reports from a file",
        description="Two modes. With --model: generate on a held-out split and score reports (clinical F1), "
                    "images (judge classifier) and answers. With --predictions: score reports written by any "
                    "system (JSONL or CSV with id and report) against --references (a dataset folder or a "
                    "JSONL/CSV file), matched by id: BLEU-1..4, ROUGE-L, METEOR, CIDEr-D, CheXpert-14 and "
                    "5-class clinical efficacy, laterality agreement, each with a bootstrap 95%% interval; "
                    "--compare scores a second system on the same studies with a paired bootstrap.")
    p.add_argument("--predictions", type=Path, help="reports to score: JSONL or CSV, an id and a report per row")
    p.add_argument("--references", type=Path, help="with --predictions: a dataset folder or a JSONL/CSV file")
    p.add_argument("--compare", type=Path, help="with --predictions: a second system's reports, compared with a "
                                                "paired bootstrap on the studies both cover")
    p.add_argument("--names", default="system,baseline", help="names of the two systems in the tables "
                                                              "(default system,baseline)")
    p.add_argument("--field", help="report column of the files (default: the first of report, prediction, "
                                   "generated, text, reference)")
    p.add_argument("--section", default="all", choices=["all", "findings", "impression"],
                   help="which part of each report to compare (default all, section headers removed)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs WordNet data)")
    p.add_argument("--labeler", default="rules", choices=["rules", "chexbert"],
                   help="who reads the clinical findings of both reports: the rule-based labeler (default) or CheXbert "
                        "(needs --chexbert-weights and --bert)")
    p.add_argument("--chexbert-weights", type=Path, help="CheXbert checkpoint (chexbert.pth) for --labeler chexbert")
    p.add_argument("--bert", type=Path, help="local bert-base-uncased folder (config.json, vocab.txt) for CheXbert")
    p.add_argument("--radgraph", type=Path, metavar="DIR",
                   help="with --predictions: add RadGraph F1 (simple, partial, complete) with the RadGraph model in "
                        "DIR (config.json, vocabulary/, weights.th: radgraph.tar.gz of StanfordAIMI/RRG_scorers, "
                        "extracted; its BERT in the local Hugging Face cache; needs pip install radgraph)")
    p.add_argument("--radgraph-model", choices=["radgraph", "radgraph-xl", "modern-radgraph-xl"],
                   help="which RadGraph model DIR holds (its report tokenisation; default: DIR's name if it is one "
                        "of these, else radgraph)")
    p.add_argument("--model", type=Path, help="trained run folder: generate and score on --data")
    p.add_argument("--vqgan", type=Path, help="with --model: VQ-GAN run (default: the one recorded with the model)")
    p.add_argument("--device", default="cpu", help="torch device for --model and --radgraph (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="with --model: requests decoded together")
    p.add_argument("--data", type=Path, help="with --model: dataset with codes and ground-truth findings")
    p.add_argument("--split", default="test", help="split to evaluate or take references from (default test)")
    p.add_argument("--classifier", type=Path, help="with --model: finding classifier run that judges generated "
                                                    "images (omit to skip report -> image)")
    p.add_argument("--n", type=int, default=200, help="with --model: studies per direction (default 200)")
    p.add_argument("--guidance", type=float, default=None,
                   help="with --model: classifier-free guidance for images (default the run's, else 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    p.add_argument("--out", type=Path, help="results folder (--predictions; default: beside the predictions) or "
                                            "results JSON (--model)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("baseline", help="reports from a reference system, to score beside a model's",
                       description="nearest-report: each image of --split gets the report of the most similar "
                                   "training image (tf-idf histograms of VQ-GAN codes per region, cosine), the "
                                   "classic retrieval baseline of report generation. Writes JSONL for "
                                   "`llm-cxr evaluate --predictions`.")
    p.add_argument("kind", choices=["nearest-report"], help="which baseline")
    p.add_argument("--data", required=True, type=Path, help="dataset encoded by `llm-cxr vqgan encode`")
    p.add_argument("--split", default="test", help="split to write reports for (default test)")
    p.add_argument("--train-split", default="train", help="split to retrieve from (default train)")
    p.add_argument("--regions", type=int, default=2, help="grid cells per side for the code histograms (default 2)")
    p.add_argument("--limit", type=int, help="at most this many studies")
    p.add_argument("--out", required=True, type=Path, help="JSONL to write")
    p.set_defaults(func=_cmd_baseline)


def _cmd_evaluate(args) -> int:
    if args.predictions is not None:
        return _evaluate_file(args)
    if args.model is None or args.data is None:
        raise InputError("give --predictions FILE --references DATA (score reports from a file), or --model RUN "
                         "--data DATASET (generate and score)")
    from llm_cxr.evaluation.lm_eval import evaluate_all
    from llm_cxr.lm.generation import LLMCXR

    model = LLMCXR.from_pretrained(args.model, vqgan=args.vqgan, device=args.device)
    res = evaluate_all(model, args.data, args.split, str(args.classifier) if args.classifier else None, n=args.n,
                       guidance=args.guidance, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.quiet, out=args.out)
    print(json.dumps(res["summary"], indent=2))
    return 0


def _evaluate_file(args) -> int:
    from llm_cxr.evaluation.reports import evaluate_predictions, markdown

    if args.references is None:
        raise InputError("--predictions needs --references (a dataset folder or a JSONL/CSV file)")
    if args.model is not None:
        raise InputError("--predictions scores a file; --model generates: give one of them")
    names = tuple(n.strip() for n in args.names.split(","))
    if len(names) != 2 or not all(names):
        raise InputError(f"--names takes two comma-separated names, got {args.names!r}")
    out = args.out or args.predictions.with_name(args.predictions.stem + "_metrics")
    res = evaluate_predictions(args.predictions, args.references, out, split=args.split, compare=args.compare,
                               resamples=args.resamples, seed=args.seed, section=args.section, text_field=args.field,
                               meteor=False if args.no_meteor else None, names=names, progress=not args.quiet,
                               chexbert=(args.chexbert_weights, args.bert) if args.labeler == "chexbert" else None,
                               radgraph=args.radgraph, radgraph_model=args.radgraph_model, device=args.device)
    print(markdown(res))
    for what, why in res.get("skipped", {}).items():
        print(f"{what} not computed: {why}", file=sys.stderr)
    counts = {k: v["count"] for k, v in res["problems"].items() if v["count"]}
    if counts:
        print("not scored as given: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    print(f"wrote {out}/metrics.json, metrics.md, per_class_f1.png", file=sys.stderr)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from llm_cxr.evaluation.baselines import nearest_report_dataset

    rows = nearest_report_dataset(args.data, args.split, args.train_split, args.regions, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(rows)} reports to {args.out}", file=sys.stderr)
    return 0
