"""``llm-cxr`` subcommands that use a trained model: ``generate report|image``, ``ask``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from llm_cxr.configs import IMAGE_TEMPERATURE, IMAGE_TOP_P
from llm_cxr.errors import InputError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="trained run folder (from `llm-cxr train`) or RUN/model")
    p.add_argument("--vqgan", type=Path, help="VQ-GAN run (default: the one recorded with the model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cpu (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _sampling_args(p: argparse.ArgumentParser, temperature: float | None, top_p: float) -> None:
    said = (f"the run's: its preset's image_temperature, else {IMAGE_TEMPERATURE}" if temperature is None
            else temperature)
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default {said})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default 0)")


def _write_rows(rows: list[dict], out: Path | None) -> None:
    """JSONL (default, or a .jsonl path) or CSV (a .csv path); stdout when no path."""
    if out is None:
        for r in rows:
            print(json.dumps(r))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a full disk never leaves half a file
    try:
        if out.suffix == ".csv":
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
                w.writeheader()
                w.writerows(rows)
        else:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)


def add_generation_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate reports from images or images from reports")
    gsub = gen.add_subparsers(dest="generate_command", metavar="WHAT")
    gsub.required = True
    p = gsub.add_parser("report", help="write a radiology report for each image",
                        description="Reports for image files (PNG, JPEG, DICOM; any size, preprocessed as in "
                                    "training) or for every image of a dataset split (--data).")
    _model_args(p)
    p.add_argument("images", nargs="*", type=Path, help="image files")
    p.add_argument("--data", type=Path, help="instead of files: a dataset folder (rows with codes or images)")
    p.add_argument("--split", default="test", help="dataset split with --data (default test)")
    p.add_argument("--limit", type=int, help="at most this many dataset rows")
    p.add_argument("--out", type=Path, help="write JSONL (or .csv) here instead of stdout")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest report in tokens (default 160)")
    _guide_args(p, "the report must state", "a model trained for checklist-guided reports (stage.report_guided) "
                                              "writes without reading the image first")
    _sampling_args(p, 0.0, 1.0)
    p.set_defaults(func=_cmd_report)

    p = gsub.add_parser("image", help="draw a chest X-ray for each report",
                        description="Images for report texts (--report, repeatable), a text file with one report "
                                    "per line (--reports-file), or a dataset split (--data). Always exactly one "
                                    "decodable image per request.")
    _model_args(p)
    p.add_argument("--report", action="append", default=[], help="report text (repeatable)")
    p.add_argument("--reports-file", type=Path, help="text file, one report per line")
    p.add_argument("--data", type=Path, help="dataset folder: draw its reports")
    p.add_argument("--split", default="test", help="dataset split with --data (default test)")
    p.add_argument("--limit", type=int, help="at most this many reports")
    p.add_argument("--out", required=True, type=Path, help="folder for PNGs and images.jsonl")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 = off, higher follows the report more closely (default "
                        "the run's: its preset's image_guidance, else 1)")
    p.add_argument("--candidates", type=int, default=1,
                   help="draw this many images per report and keep the one the run's finding head finds closest "
                        "to the findings the report states (needs a run trained with finding_head: conv)")
    _sampling_args(p, None, IMAGE_TOP_P)
    p.set_defaults(func=_cmd_image)

    p = sub.add_parser("ask", help="answer a question about a chest X-ray (visual question answering)")
    _model_args(p)
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--question", "-Q", action="append", required=True,
                   help="question (repeatable; each is asked about every image)")
    p.add_argument("--out", type=Path, help="write JSONL (or .csv) here instead of stdout")
    _guide_args(p, "the question's prompt states", "a model trained for guided questions (stage.vqa_guided) "
                                                   "answers without reading the image first (the LM alone)")
    _sampling_args(p, 0.0, 1.0)
    p.set_defaults(func=_cmd_ask)


def _load(args):
    from llm_cxr.lm.generation import LLMCXR

    return LLMCXR.from_pretrained(args.model, vqgan=args.vqgan, device=args.device)


def _sampling(args):
    from llm_cxr.lm.generation import Sampling

    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _dataset_rows(args):
    from llm_cxr.data.dataset import load_dataset

    ds = load_dataset(args.data, split=args.split)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    return ds


def _check_files(paths: list[Path]) -> None:
    """Before the model loads: every path must at least be a file (a typo should not cost a model load)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing and len(missing) == len(paths):
        from llm_cxr.errors import NothingUsableError

        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise NothingUsableError(f"no image file to read (missing, or not a file): {shown}")


def _read_images(model, paths: list) -> tuple[list, list]:
    """(good paths, their images at the model's size); a file that cannot be read is reported on stderr, counted,
    and skipped; none usable is an error (exit 3)."""
    from llm_cxr.data.images import load_image
    from llm_cxr.errors import LLMCXRError, NothingUsableError

    if model.vqgan is None:  # codes_of says what is missing
        return [str(p) for p in paths], [str(p) for p in paths]
    good, images, bad = [], [], []
    for p in paths:
        try:
            images.append(load_image(p, size=model.vqgan.config.resolution))
            good.append(str(p))
        except (LLMCXRError, OSError) as e:
            bad.append(f"{p}: {e}")
    for line in bad:
        print(f"skipped {line}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} of {len(paths)} image(s) skipped", file=sys.stderr)
    if not good:
        raise NothingUsableError(f"none of the {len(paths)} image(s) could be read")
    return good, images


def _cmd_report(args) -> int:
    import torch

    if args.images and not args.data:
        _check_files(args.images)
    model = _load(args)
    if args.data:
        ds = _dataset_rows(args)
        ids = list(ds["id"])
        inputs = torch.as_tensor(ds.with_format("numpy")[:]["codes"]).long() if "codes" in ds.column_names \
            else list(ds["image"])
    elif args.images:
        ids, inputs = _read_images(model, args.images)
    else:
        raise InputError("give image files or --data")
    codes = model.codes_of(inputs)
    findings = _stated(model, args, codes, "report")
    texts = model.generate_report(codes, _sampling(args), max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, guided=False, findings=findings)
    rows = [{"id": i, "report": t} | ({"findings": f} if findings is not None else {})
            for i, t, f in zip(ids, texts, findings or [None] * len(texts))]
    _write_rows(rows, args.out)
    return 0


def _cmd_image(args) -> int:
    reports = list(args.report)
    if args.reports_file:
        if not args.reports_file.exists():
            raise InputError(f"{args.reports_file} does not exist")
        reports += [line.strip() for line in args.reports_file.read_text().splitlines() if line.strip()]
    ids = [f"report_{i:04d}" for i in range(len(reports))]
    if args.data:
        ds = _dataset_rows(args)
        reports += list(ds["report"])
        ids += list(ds["id"])
    if not reports:
        raise InputError("give --report TEXT, --reports-file or --data")
    model = _load(args)
    if model.vqgan is None:
        raise InputError("no VQ-GAN to draw with: pass --vqgan RUN")
    asked = None
    if args.candidates > 1:
        from llm_cxr.lm.prompts import requested_findings

        asked = [requested_findings(r) for r in reports]
    if args.temperature is None:
        args.temperature = model.image_sampling().temperature
    out = model.generate_image(reports, _sampling(args), guidance=args.guidance, batch_size=args.batch_size,
                               candidates=args.candidates, findings=asked)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rid, rep, im, codes) in enumerate(zip(ids, reports, out.images, out.codes)):
        name = f"{i:04d}.png"
        im.save(args.out / name)
        rows.append({"id": rid, "report": rep, "image": name, "codes": codes.flatten().tolist()}
                    | ({"asked": asked[i]} if asked else {}))
    _write_rows(rows, args.out / "images.jsonl")
    return 0


def _guide_args(p, states: str, plain: str) -> None:
    p.add_argument("--findings", help="comma-separated finding names, optionally with a side (e.g. "
                                      f"pleural_effusion:right,chest_tube) {states}, for every image, "
                                      "instead of the model's own reading")
    p.add_argument("--plain", action="store_true", help=plain)


def _stated(model, args, codes, task: str) -> list[list[str]] | None:
    """What the prompts will state per image (read once, written beside the output), or None: plain."""
    if args.findings and args.plain:
        raise InputError("--findings and --plain exclude each other")
    trained = model.guided_reports if task == "report" else model.guided_vqa
    if args.findings and not trained:
        what = "reports" if task == "report" else "answers"
        flag = "stage.report_guided" if task == "report" else "stage.vqa_guided"
        raise InputError(f"{args.model} was not trained to write {what} from a findings list ({flag}), so "
                         f"--findings would only confuse it; leave it out, or use a run trained with guided prompts")
    given = [[f.strip() for f in args.findings.split(",") if f.strip()]] * len(codes) if args.findings else None
    return model.stated_findings(codes, False if args.plain else None, given, args.batch_size, task=task)


def _cmd_ask(args) -> int:
    _check_files(args.images)
    model = _load(args)
    files, images = _read_images(model, args.images)
    codes = model.codes_of(images)
    findings = _stated(model, args, codes, "vqa")
    n = len(args.question)
    answers = model.answer(codes.repeat_interleave(n, 0), [q for _ in files for q in args.question], _sampling(args),
                           batch_size=args.batch_size, guided=False,
                           findings=[f for f in findings for _ in range(n)] if findings is not None else None)
    rows = [{"image": f, "question": q, "answer": answers[i * n + j]} | ({"findings": findings[i]} if findings else {})
            for i, f in enumerate(files) for j, q in enumerate(args.question)]
    _write_rows(rows, args.out)
    return 0
