"""``llm-cxr explain``: which image regions drove a report's sentences, which words drove a drawing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm_cxr.errors import InputError


def add_explain_command(sub) -> None:
    from llm_cxr.explain import METHODS

    p = sub.add_parser("explain", help="explain a report (which image regions) or a drawing (which words)",
                       description="image -> report: give IMAGE; every sentence of the report the model writes for "
                                   "it is explained (or the phrase --target). report -> image: give --report; the "
                                   "image the model draws for it is explained word by word. Writes "
                                   "explanation.json, maps.npy and pictures (PNG overlays / an HTML page) to --out.")
    p.add_argument("image", nargs="?", type=Path, help="a chest X-ray (PNG, JPEG, DICOM)")
    p.add_argument("--report", help="explain the drawing of this report instead of an image")
    p.add_argument("--model", required=True, type=Path, help="trained run folder (from `llm-cxr train`)")
    p.add_argument("--vqgan", type=Path, help="VQ-GAN run (default: the one recorded with the model)")
    p.add_argument("--method", default="m2ib", choices=sorted(METHODS), help="attribution method (default m2ib)")
    p.add_argument("--target", help="explain this phrase (e.g. 'small left pleural effusion') instead of the "
                                    "model's own report")
    p.add_argument("--out", type=Path, default=Path("explanation"), help="output folder (default ./explanation)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. beta=1, layer=3, steps=20, samples=10, normalize=true (M2IB; "
                        "head_beta=..., head_steps=... for the finding head's route of a guided run)")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    from llm_cxr.cli.lm import parse_set_pairs

    if (args.image is None) == (args.report is None):
        raise InputError("give an IMAGE to explain its report, or --report TEXT to explain its drawing (not both)")
    if args.image is not None and not args.image.is_file():
        raise InputError(f"{args.image}: no such image file")
    if args.report is not None and args.target is not None:
        raise InputError("--target explains a phrase of a report written from an image; with --report, leave it out")
    options = parse_set_pairs(args.set)

    from llm_cxr.explain import explain
    from llm_cxr.lm.generation import LLMCXR

    model = LLMCXR.from_pretrained(args.model, vqgan=args.vqgan, device=args.device)
    picture = None
    if args.image is not None:
        from llm_cxr.data.images import load_image

        if model.vqgan is None:
            raise InputError(f"{args.model} has no VQ-GAN to read {args.image} with; pass --vqgan")
        picture = load_image(args.image, size=model.vqgan.config.resolution)
        ex = explain(model, image=picture, method=args.method, target=args.target, progress=sys.stderr.isatty(),
                     **options)
    else:
        ex = explain(model, report=args.report, method=args.method, progress=sys.stderr.isatty(), **options)
    ex.save(args.out)
    shown = ex.plot(args.out, picture)
    print(json.dumps({"out": str(args.out), "method": ex.method, "direction": ex.direction, "report": ex.report,
                      "targets": ex.targets, "pictures": [str(p) for p in shown], "seconds": round(ex.seconds, 2),
                      "notes": ex.notes}, indent=2))
    return 0
