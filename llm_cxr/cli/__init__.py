"""The ``llm-cxr`` command line: one console script with subcommands.

Each subcommand parses its options here and calls one library function; the library
itself never parses arguments. Errors that are the user's to fix (``llm_cxr.errors``)
are printed as one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from llm_cxr import __version__
from llm_cxr.errors import LLMCXRError, NothingUsableError

log = logging.getLogger("llm_cxr")


def _add_common_import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output dataset folder (Arrow, overwritten)")
    p.add_argument("--size", type=int, default=512,
                   help="images are resized so the shorter side is SIZE and centre-cropped square "
                        "(default 512; 0 keeps the original size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-patient train/val/test split")
    p.add_argument("--limit", type=int, default=None, help="import at most this many images")
    p.add_argument("--no-label", action="store_true",
                   help="do not run the report labeler to fill the labels/findings columns")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-cxr",
        description="Teach a language model to read and draw chest X-rays, and explain what it did.",
    )
    parser.add_argument("--version", action="version", version=f"llm-cxr {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="use a VQ-GAN or language-model run that stopped before its end (a warning, not an error)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _add_data_commands(sub)
    _add_vqgan_commands(sub)
    _add_classifier_and_demo_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """``llm-cxr data ...``: make, import, label and look at datasets."""
    data = sub.add_parser("data", help="make, import and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    p = dsub.add_parser("synth", help="generate synthetic chest X-rays with findings, masks and reports",
                        description="Generate a synthetic chest X-ray dataset with ground truth: "
                                    "findings (with laterality, location, severity), a pixel mask per "
                                    "finding, and a radiology-style report.")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, 64-512 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder (Arrow, overwritten)")
    p.add_argument("--correlate", action="append", default=[], metavar="FINDING:DEVICE:RATE",
                   help="plant a shortcut: DEVICE appears with FINDING at RATE (0-1), e.g. "
                        "pneumothorax:chest_tube:0.95; may be repeated")
    p.add_argument("--images-per-patient", type=float, default=1.5,
                   help="mean number of studies per patient (default 1.5); splits are by patient")
    p.add_argument("--workers", type=int, default=1, help="generator processes (default 1)")
    p.set_defaults(func=_cmd_synth)

    imp = dsub.add_parser("import", help="convert a real dataset to the llm-cxr schema")
    isub = imp.add_subparsers(dest="import_kind", metavar="KIND")
    isub.required = True
    p = isub.add_parser("mimic", help="MIMIC-CXR-JPG (files/pXX/pID/sSTUDY/*.jpg + metadata CSVs + reports)")
    p.add_argument("root", type=Path, help="MIMIC-CXR-JPG root (holds files/ and the CSVs)")
    p.add_argument("--reports", type=Path, default=None,
                   help="root of the MIMIC-CXR reports (files/pXX/pID/sSTUDY.txt); default: ROOT")
    p.add_argument("--views", default="PA,AP", help="view positions to keep (default PA,AP: frontal)")
    _add_common_import_args(p)
    p.set_defaults(func=_cmd_import)
    p = isub.add_parser("iu", help="IU X-ray as on Kaggle (indiana_reports.csv, indiana_projections.csv, images/)")
    p.add_argument("root", type=Path, help="folder with indiana_reports.csv and indiana_projections.csv")
    p.add_argument("--images", type=Path, default=None,
                   help="image folder (default: ROOT/images/images_normalized or ROOT/images)")
    p.add_argument("--all-views", action="store_true", help="keep lateral views too (default: frontal only)")
    _add_common_import_args(p)
    p.set_defaults(func=_cmd_import)
    p = isub.add_parser("table", help="a CSV or JSONL with an image path and report text per row")
    p.add_argument("path", type=Path, help="the .csv or .jsonl file")
    p.add_argument("--image-column", default="image", help="column with the image path (default image)")
    p.add_argument("--report-column", default="report", help="column with the report text (default report)")
    p.add_argument("--patient-column", default=None, help="column with the patient id (default: one patient per row)")
    p.add_argument("--root", type=Path, default=None,
                   help="image paths are relative to this (default: the table's folder)")
    _add_common_import_args(p)
    p.set_defaults(func=_cmd_import)
    p = isub.add_parser("folder", help="a folder of images (PNG, JPEG, DICOM) without text")
    p.add_argument("path", type=Path, help="the folder (searched recursively)")
    _add_common_import_args(p)
    p.set_defaults(func=_cmd_import)

    p = dsub.add_parser("label", help="extract CheXpert-style labels from report text")
    p.add_argument("text", nargs="*", help="report text (or use --file)")
    p.add_argument("--file", type=Path, default=None, help="a text file holding one report")
    p.set_defaults(func=_cmd_label)

    p = dsub.add_parser("sheet", help="write a contact sheet (PNG + HTML) of a dataset's images and reports")
    p.add_argument("--data", required=True, type=Path, help="dataset folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.set_defaults(func=_cmd_sheet)

    from llm_cxr.cli.evaluate import add_evaluate_commands
    from llm_cxr.cli.explain import add_explain_command
    from llm_cxr.cli.gen import add_generation_commands
    from llm_cxr.cli.lm import add_lm_commands
    from llm_cxr.cli.serve import add_serve_command

    add_lm_commands(sub)
    add_generation_commands(sub)
    add_evaluate_commands(sub)
    add_serve_command(sub)
    add_explain_command(sub)


def _add_vqgan_commands(sub) -> None:
    """``llm-cxr vqgan ...``: train, encode, decode, reconstruct, import-taming."""
    vq = sub.add_parser("vqgan", help="the image tokenizer: train, encode, decode, import taming checkpoints")
    vsub = vq.add_subparsers(dest="vqgan_command", metavar="VQGAN_COMMAND")
    vsub.required = True
    p = vsub.add_parser("train", help="train (or resume) a VQ-GAN on a dataset",
                        description="Train a VQ-GAN with accelerate. Run again with the same --out to resume "
                                    "after an interruption. Launch with `accelerate launch -m llm_cxr vqgan train ...` "
                                    "for several processes.")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (from `llm-cxr data synth` or an importer)")
    p.add_argument("--config", default="small",
                   help="preset (tiny, small, llm-cxr-256) or a YAML with `model:` (preset, dict or taming YAML path) "
                        "and training keys (default small)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="images per step and process")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--disc-start", type=int, help="step at which the discriminator switches on")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="mixed precision (default from config: no)")
    p.add_argument("--feature-net", help="frozen network (torch.export .pt2 or TorchScript) for the feature loss, "
                                                 "e.g. the classifier's feature_net.pt2")
    p.add_argument("--max-minutes", type=float, help="stop and save after this many minutes (resume later)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any training key")
    p.set_defaults(func=_cmd_vqgan_train)
    p = vsub.add_parser("encode", help="add a `codes` column (int16, h*w) to a dataset")
    p.add_argument("--model", required=True, type=Path, help="VQ-GAN run or model folder")
    p.add_argument("--data", required=True, type=Path, help="input dataset")
    p.add_argument("--out", required=True, type=Path, help="output dataset (a copy with codes)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on recent CPUs and GPUs)")
    p.add_argument("--resize", choices=["warn", "error", "silent"], default="warn",
                   help="images of another size than the model's: resize with a warning (default), refuse, or "
                        "resize quietly")
    p.add_argument("--chunk-size", type=int, default=10_000,
                   help="images per finished piece: rerun after an interruption and it continues from the last "
                        "finished piece (default 10000)")
    p.set_defaults(func=_cmd_vqgan_encode)
    p = vsub.add_parser("decode", help="codes -> PNG images")
    p.add_argument("--model", required=True, type=Path, help="VQ-GAN run or model folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--codes", type=Path, help=".npy or .json file with codes, shape (N, h*w) or (N, h, w)")
    g.add_argument("--data", type=Path, help="an encoded dataset (with a codes column)")
    p.add_argument("--n", type=int, default=16, help="with --data: how many rows (default 16)")
    p.add_argument("--out", required=True, type=Path, help="output folder for PNGs")
    p.set_defaults(func=_cmd_vqgan_decode)
    p = vsub.add_parser("reconstruct", help="encode and decode image files (PNG, JPEG, DICOM)")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--model", required=True, type=Path, help="VQ-GAN run or model folder")
    p.add_argument("--out", required=True, type=Path, help="output folder: NAME_recon.png per input, and psnr.json")
    p.set_defaults(func=_cmd_vqgan_reconstruct)
    p = vsub.add_parser("import-taming", help="convert a taming-transformers checkpoint (yaml + ckpt)")
    p.add_argument("config", type=Path, help="taming config .yaml")
    p.add_argument("ckpt", type=Path, help="taming checkpoint .ckpt")
    p.add_argument("--out", required=True, type=Path, help="output model folder (safetensors + config.json)")
    p.add_argument("--grayscale", action="store_true", help="convert an RGB model to one grayscale channel")
    p.set_defaults(func=_cmd_vqgan_import)


def _add_classifier_and_demo_commands(sub) -> None:
    """``llm-cxr classifier ...``, the LM, generation and serving commands, and ``llm-cxr demo``."""
    cl = sub.add_parser("classifier", help="the finding classifier (checks images for findings)")
    csub = cl.add_subparsers(dest="classifier_command", metavar="CLASSIFIER_COMMAND")
    csub.required = True
    p = csub.add_parser("train", help="train the finding classifier on a dataset with ground-truth findings")
    p.add_argument("--data", required=True, type=Path, help="dataset with train/val/test splits")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--resolution", type=int, default=128, help="input size (default 128)")
    p.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--export-feature-net", action="store_true",
                   help="also write feature_net.pt2 (torch.export) for `vqgan train --feature-net`")
    p.set_defaults(func=_cmd_classifier_train)

    p = sub.add_parser("demo", help="run everything end to end on synthetic data and write OUT/index.html",
                       description="End-to-end demo on the embedded synthetic data. Writes "
                                   "OUT/summary.json and OUT/index.html. A second run reuses cached work.")
    p.add_argument("--out", type=Path, default=Path("OUT"), help="output folder (default OUT)")
    from llm_cxr.demo import DemoConfig

    d = DemoConfig()  # the defaults live in one place
    p.add_argument("--n", type=int, default=d.n, help=f"synthetic images (default {d.n})")
    p.add_argument("--size", type=int, default=d.size, help=f"image size (default {d.size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--vqgan-steps", type=int, default=d.vqgan_steps,
                   help=f"training steps of the tiny VQ-GAN (default {d.vqgan_steps})")
    p.add_argument("--lm-pretrain-steps", type=int, default=d.lm_pretrain_steps,
                   help=f"report-text pretraining steps of the tiny base LM (default {d.lm_pretrain_steps})")
    p.add_argument("--lm-steps", type=int, default=d.lm_steps,
                   help=f"LoRA fine-tuning steps of the tiny LM (default {d.lm_steps})")
    p.add_argument("--classifier-epochs", type=int, default=d.classifier_epochs,
                   help="epochs of the finding classifier that judges generated images "
                        f"(default {d.classifier_epochs})")
    p.add_argument("--n-eval", type=int, default=d.n_eval,
                   help=f"test studies per generation task (default {d.n_eval})")
    p.add_argument("--n-explain", type=int, default=d.n_explain,
                   help=f"test studies whose generated reports the page explains with M2IB (default {d.n_explain})")
    p.add_argument("--fresh", action="store_true", help="ignore cached results and redo everything")
    p.set_defaults(func=_cmd_demo)




# ---- command implementations ---------------------------------------------------------------

def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_synth(args: argparse.Namespace) -> int:
    from llm_cxr.data.synth import SynthConfig, generate_dataset, parse_correlate

    cfg = SynthConfig(
        size=args.size,
        correlations=[parse_correlate(s) for s in args.correlate],
        images_per_patient=args.images_per_patient,
    )
    summary = generate_dataset(args.n, args.out, cfg, seed=args.seed, workers=args.workers,
                               progress=not args.quiet)
    _print_json(summary.to_dict())
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from llm_cxr.data import importers
    from llm_cxr.data.labeler import dataset_labels

    common = dict(out=args.out, size=args.size, seed=args.seed, limit=args.limit,
                  label=None if args.no_label else dataset_labels, progress=not args.quiet)
    if args.import_kind == "mimic":
        views = tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
        summary = importers.import_mimic(args.root, reports_root=args.reports, views=views, **common)
    elif args.import_kind == "iu":
        summary = importers.import_iu(args.root, images_dir=args.images, frontal_only=not args.all_views, **common)
    elif args.import_kind == "table":
        summary = importers.import_table(args.path, image_column=args.image_column,
                                         report_column=args.report_column,
                                         patient_column=args.patient_column, root=args.root, **common)
    else:
        summary = importers.import_folder(args.path, **common)
    _print_json(summary.to_dict())
    if summary.n_bad:
        print(f"{summary.n_bad} bad item(s) skipped; see {Path(summary.out_dir) / 'bad_items.jsonl'}",
              file=sys.stderr)
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from llm_cxr.data.labeler import label_report

    if args.file is not None:
        if not args.file.is_file():
            raise LLMCXRError(f"{args.file} {'is not a file' if args.file.exists() else 'does not exist'}")
        try:
            texts = [args.file.read_bytes().decode("utf-8")]
        except UnicodeDecodeError as e:
            raise LLMCXRError(f"{args.file}: not UTF-8 text (byte {e.start}: {e.reason}); "
                              f"convert it, e.g. iconv -f latin1 -t utf-8") from e
    elif args.text:
        texts = [" ".join(args.text)]
    else:
        texts = [sys.stdin.read()]
    for text in texts:
        _print_json(label_report(text).to_dict())
    return 0


def _cmd_sheet(args: argparse.Namespace) -> int:
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.report_html import write_contact_sheet

    ds = load_dataset(args.data)
    path = write_contact_sheet(ds, args.out, n=args.n)
    print(path)
    return 0


def _cmd_vqgan_train(args: argparse.Namespace) -> int:
    from llm_cxr.cli.lm import parse_set_pairs
    from llm_cxr.vqgan.train import load_train_config, train_vqgan

    overrides = {k: v for k, v in {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "disc_start": args.disc_start,
        "mixed_precision": args.mixed_precision, "feature_net": args.feature_net, "max_minutes": args.max_minutes,
        "seed": args.seed}.items() if v is not None}
    overrides.update(parse_set_pairs(args.set))
    cfg = load_train_config(args.config, data=str(args.data), out=str(args.out), progress=not args.quiet, **overrides)
    run = train_vqgan(cfg)
    print(run)
    return 0


def _cmd_vqgan_encode(args: argparse.Namespace) -> int:
    from llm_cxr.vqgan.encode import encode_dataset

    _print_json(encode_dataset(args.model, args.data, args.out, batch_size=args.batch_size, autocast=args.bf16,
                               resize=args.resize, progress=not args.quiet, chunk_size=args.chunk_size))
    return 0


def _cmd_vqgan_decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from llm_cxr.errors import InputError
    from llm_cxr.vqgan import VQGAN

    model = VQGAN.from_pretrained(args.model)
    if args.codes is not None:
        if not args.codes.exists():
            raise InputError(f"{args.codes} does not exist")
        try:
            codes = np.load(args.codes) if args.codes.suffix == ".npy" else np.array(json.loads(args.codes.read_text()))
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read codes from {args.codes}: {e}") from e
        names = [f"codes_{i:04d}" for i in range(len(codes))]
    else:
        from llm_cxr.data.dataset import load_dataset

        ds = load_dataset(args.data)
        if "codes" not in ds.column_names:
            raise InputError(f"{args.data} has no codes column; run `llm-cxr vqgan encode` first")
        ds = ds.select(range(min(args.n, len(ds)))).select_columns(["id", "codes"])
        codes, names = np.array(ds["codes"]), ds["id"]
    if codes.ndim == 1:
        codes = codes[None]
    args.out.mkdir(parents=True, exist_ok=True)
    images = VQGAN.to_pil(model.decode(torch.as_tensor(codes.astype(np.int64))))
    for name, im in zip(names, images):
        im.save(args.out / f"{name}.png")
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def _cmd_vqgan_reconstruct(args: argparse.Namespace) -> int:
    from llm_cxr.vqgan.reconstruct import reconstruct_files

    result = reconstruct_files(args.model, args.images, args.out, progress=not args.quiet)
    _print_json({"n_ok": result["n_ok"], "n_bad": result["n_bad"], "mean_psnr": result["mean_psnr"],
                 "out": str(args.out)})
    return 0 if result["n_ok"] else 3


def _cmd_vqgan_import(args: argparse.Namespace) -> int:
    from llm_cxr.vqgan import import_taming

    print(import_taming(args.config, args.ckpt, args.out, grayscale=args.grayscale))
    return 0


def _cmd_classifier_train(args: argparse.Namespace) -> int:
    from llm_cxr.classifier import ClassifierTrainConfig, FindingClassifier, train_classifier

    metrics = train_classifier(ClassifierTrainConfig(data=str(args.data), out=str(args.out),
                                                     resolution=args.resolution, epochs=args.epochs,
                                                     seed=args.seed, progress=not args.quiet))
    if args.export_feature_net:
        FindingClassifier.from_pretrained(args.out).export_feature_net(args.out / "feature_net.pt2")
    _print_json(metrics)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from llm_cxr.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig(out=args.out, n=args.n, size=args.size, seed=args.seed,
                                  fresh=args.fresh, progress=not args.quiet, vqgan_steps=args.vqgan_steps,
                                  lm_pretrain_steps=args.lm_pretrain_steps, lm_steps=args.lm_steps,
                                  classifier_epochs=args.classifier_epochs, n_eval=args.n_eval,
                                  n_explain=args.n_explain))
    p = summary["paths"]
    print(f"demo finished in {summary['seconds_total']:.1f} s (building everything took "
          f"{summary['seconds_built']:.0f} s): open {args.out / 'index.html'}\n"
          f"  model      {p['model']}\n  VQ-GAN     {p['vqgan']}\n  data       {p['data']} (with codes)\n"
          f"  classifier {p['classifier']}\ntry:\n"
          f"  llm-cxr generate report --model {p['model']} --data {p['data']} --limit 4\n"
          f"  llm-cxr generate image --model {p['model']} --report \"Large left pleural effusion.\" --out drawn/\n"
          f"  llm-cxr serve --model {p['model']}")
    return 0


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.INFO if verbose <= 1 else logging.DEBUG)
    if not quiet and verbose == 0:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("datasets", "urllib3", "filelock", "PIL", "fsspec", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


_GLOBAL_FLAGS = ("-q", "--quiet", "-v", "-vv", "-vvv", "--verbose", "--allow-unfinished")


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # progress bars written to a file or a pipe: one update every 10 s, not a carriage-return line per step.
        # tqdm reads these when it is first imported (every bar, ours and the libraries'), so before the parser
        # (which imports the library) is built
        os.environ.setdefault("TQDM_MININTERVAL", "10")
        os.environ.setdefault("TQDM_MAXINTERVAL", "60")
        # the libraries' own short bars (datasets' "Filter", "Map"; transformers' "Loading weights") say nothing
        # a log needs: off, ours stay
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # -q / -v are global, but users type them after the subcommand too: accept both places
    argv = [a for a in argv if a in _GLOBAL_FLAGS] + [a for a in argv if a not in _GLOBAL_FLAGS]
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "allow_unfinished", False):
        from llm_cxr.configs import ALLOW_UNFINISHED_ENV

        os.environ[ALLOW_UNFINISHED_ENV] = "1"
    if args.quiet:
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights" bar reads it too
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        return int(args.func(args) or 0)
    except NothingUsableError as e:
        print(f"llm-cxr: error: {e}", file=sys.stderr)
        return 3
    except LLMCXRError as e:
        print(f"llm-cxr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-cxr: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a read-only folder, a full disk, a vanished file: say which and why, no traceback
        print(f"llm-cxr: error: {_os_error_text(e, getattr(args, 'out', None))}", file=sys.stderr)
        log.debug("OSError", exc_info=True)
        return 2
    except Exception as e:  # noqa: BLE001 - third-party formats (safetensors, arrow) raise their own types
        why = _foreign_error_text(e)
        if why is None:
            raise
        print(f"llm-cxr: error: {why}", file=sys.stderr)
        return 2


def _os_error_text(e: OSError, out: Path | None = None) -> str:
    """One line for an OSError; a failed write that names no file (a buffered write, say) names ``out``."""
    import errno

    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
    if not where and out is not None and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        where = f"writing to {out}"
    hint = {errno.ENOSPC: "the disk is full: free space or choose another --out; finished work is kept",
            errno.EROFS: "the file system is read-only: choose another --out",
            errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(e.errno)
    text = hint or e.strerror or str(e)
    return f"{where}: {text}" if where else f"{text} ({e})" if hint else str(e)


def _foreign_error_text(e: Exception) -> str | None:
    """A one-line message for the errors of file formats we read (a corrupt weights file, say), else None."""
    kind = type(e).__name__
    if kind == "SafetensorError":
        return f"a weights file (.safetensors) is truncated or corrupt ({e}); re-copy it or retrain"
    if kind in ("ArrowInvalid", "ArrowIOError"):
        return f"a dataset file is truncated or corrupt ({kind}: {e}); rebuild the dataset"
    if "No space left on device" in str(e) or "enforce fail at inline_container" in str(e):
        return f"could not write a checkpoint: the disk is probably full ({str(e).splitlines()[0]})"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
