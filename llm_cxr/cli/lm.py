"""``llm-cxr`` subcommands for the language model: ``lm pretrain``, ``train``, ``merge``."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from llm_cxr.errors import LLMCXRError


def parse_set_pairs(items: list[str]) -> dict:
    """``--set KEY=VALUE`` options (values parsed as YAML; dotted keys nest) -> a dict."""
    import yaml

    out: dict = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep:
            raise LLMCXRError(f"--set expects KEY=VALUE (KEY may be dotted, e.g. stage.vqa=4), got {kv!r}")
        node = out
        parts = key.strip().replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per step and process")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="mixed precision (default bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this many minutes")
    p.add_argument("--seed", type=int, help="random seed")


def _loop_overrides(args) -> dict:
    keys = ("steps", "batch_size", "grad_accum", "lr", "mixed_precision", "gradient_checkpointing", "max_minutes",
            "seed")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "quiet", False):
        out["progress"] = False
    return out


def add_lm_commands(sub) -> None:
    lm = sub.add_parser("lm", help="the embedded base language model")
    lsub = lm.add_subparsers(dest="lm_command", metavar="LM_COMMAND")
    lsub.required = True
    p = lsub.add_parser("pretrain", help="train a report tokenizer and a small GPT-NeoX on report text",
                        description="Make the embedded default base LM: a byte-level BPE tokenizer trained on the "
                                    "dataset's training reports and a small GPT-NeoX trained on their text. Its "
                                    "OUT/model folder is a Hugging Face model to give `llm-cxr train` as base.")
    p.add_argument("--data", required=True, type=Path, help="dataset with reports")
    p.add_argument("--out", required=True, type=Path, help="run folder (the model goes to OUT/model)")
    p.add_argument("--preset", default="small", help="model size: tiny or small (default small)")
    _loop_args(p)
    p.set_defaults(func=_cmd_pretrain)

    from llm_cxr.train.config import config_help_text

    p = sub.add_parser("train", help="fine-tune a causal LM on image/report/VQA instructions (LoRA or full)",
                       epilog=config_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           "Train one multimodal stage. Settings come from a shipped preset (--preset small --stage 1) "
                           "or --config (YAML with the keys listed below) and the options below, which override it. "
                           "Rerun with the same --out to resume. Several processes: "
                           "`accelerate launch training/train.py --config YAML`.", 100))
    p.add_argument("--config", help="YAML config file (keys of LMTrainConfig)")
    p.add_argument("--preset", help="a shipped preset instead of --config: tiny or small (with --stage)")
    p.add_argument("--stage", type=int, help="the preset's stage (small: 0, 1, 2; tiny: 1)")
    p.add_argument("--data", help="dataset with a codes column (`llm-cxr vqgan encode`)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--base", help="base model: hub name or folder (e.g. RUN/model of `llm-cxr lm pretrain`)")
    p.add_argument("--init-from", help="continue a previous stage's run instead of starting from --base")
    p.add_argument("--full-finetune", action="store_true", default=None, help="train all weights instead of LoRA")
    _loop_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (stage.vqa=4, lora.r=32, loop.eval_every=100)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("merge", help="merge a LoRA run into its base model (a standalone model folder)")
    p.add_argument("run", type=Path, help="LoRA run folder")
    p.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    p.set_defaults(func=_cmd_merge)


def _cmd_pretrain(args) -> int:
    from llm_cxr.train.base import pretrain_base
    from llm_cxr.train.config import PretrainConfig

    cfg = PretrainConfig(data=str(args.data), out=str(args.out), preset=args.preset)
    for k, v in _loop_overrides(args).items():
        setattr(cfg.loop, k, v)
    cfg.loop.__post_init__()
    print(pretrain_base(cfg))
    return 0


def _cmd_train(args) -> int:
    from llm_cxr.train.config import load_lm_config, preset_path
    from llm_cxr.train.stage import train_lm

    overrides = {"data": args.data, "out": args.out, "base": args.base, "init_from": args.init_from,
                 "full_finetune": args.full_finetune, **_loop_overrides(args)}
    config = args.config
    if args.preset is not None or args.stage is not None:
        if args.config:
            raise LLMCXRError("give either --config or --preset/--stage, not both")
        if args.preset is None or args.stage is None:
            raise LLMCXRError("--preset needs --stage (e.g. --preset small --stage 1), and --stage needs --preset")
        config = preset_path(args.preset, args.stage)
    cfg = load_lm_config(config, sets=parse_set_pairs(args.set), **overrides)
    print(train_lm(cfg))
    return 0


def _cmd_merge(args) -> int:
    from llm_cxr.lm.run import merge_run

    print(json.dumps({"merged": str(merge_run(args.run, args.out))}))
    return 0
