"""Language-model training speed (issue 4): our training step against a plain transformers Trainer.

    python benchmarks/bench_lm_train.py [--data runs/synth-20k-codes] [--base runs/lm-base-small/model]
        [--steps 20] [--batch-size 16] [--examples 2000] [--stage-mix report=1,image=1,vqa=2]
        [--rounds 2] [--quick]

Target: tokens/s of our step >= 2.5x a plain Trainer baseline on this CPU. Every row trains on the
same tokenised examples, the same base model extended with the image tokens and the same LoRA
settings (taken from --config, the small stage-1 recipe), from a fresh copy with identical initial
weights (checked by a digest):

- ours:       ``llm_cxr.train.loop.train_loop`` as training runs it: bf16 autocast (accelerate),
              length-grouped batches (``LengthGroupedBatches``, ``collate`` pads to a multiple of 8),
              AdamW with gradient clipping;
- ours fp32:  the same loop with ``mixed_precision="no"``: the gap to ``ours`` is the precision,
              the gap to the baseline is mostly the batching;
- attention:  ours loads the attention kernel ``train_lm`` picks (``pick_attention``: eager for
              bf16 on CPU, where the SDPA kernel gains nothing from bf16; SDPA otherwise); the
              baseline keeps transformers' default (SDPA). Two ablation rows swap the kernel
              (``ours_sdpa``, ``baseline_eager``) so its share of the speed-up is visible;
- baseline:   ``transformers.Trainer`` in fp32 (``use_cpu``, no bf16), random batches
              (``train_sampling_strategy="random"``), a collator that pads to the longest
              sequence of the batch (labels -100 on prompt and padding), default optimizer
              (``adamw_torch_fused``), no evaluation, no saving, no reporting.

Tokens/s counts real (non-pad) tokens (attention-mask sum, prompt included, as ``metrics.csv``
does) over steps ``warmup+1..steps``: a forward pre-hook on the model records each batch and a
global optimizer step hook stamps the end of every step, so the same instrument times every row
and the first ``--warmup`` steps are left out. Each measurement runs in its own process; the rows
are measured ``--rounds`` times in rotated order and the best round counts, and the CPU that other
processes used meanwhile is recorded (on a 2-core machine any other job slows a 2-thread step a
lot). The padding share of each batching method is given for the timed batches and, from the
lengths alone, for whole epochs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.5


# --------------------------------------------------------------------------- data and model


def parse_stage_mix(text: str | None):
    """``report=1,image=1,vqa=2`` -> StageConfig (unnamed fields keep their defaults)."""
    from llm_cxr.train.config import StageConfig

    if not text:
        return StageConfig()
    names = {f.name: f.type for f in fields(StageConfig)}
    kw = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in names or not v:
            raise SystemExit(f"--stage-mix: expected KEY=VALUE with KEY in {sorted(names)}, got {part!r}")
        kw[k] = v.strip() if k == "sections" else (v.strip().lower() in ("1", "true", "yes") if k == "one_per_patient"
                                                   else int(v))
    return StageConfig(**kw)


def make_model(base: str, codes_info: dict, lora, seed: int, attn: str | None = None):
    """A fresh base model with the image tokens and LoRA; identical for the same ``seed``.

    ``attn``: transformers' attention implementation (None: what ``load_causal_lm`` picks, SDPA).
    """
    from llm_cxr.lm.run import load_causal_lm
    from llm_cxr.lm.tokens import add_image_tokens
    from llm_cxr.train.lora import apply_lora

    model, tok = load_causal_lm(base) if attn is None else load_causal_lm(base, attn_implementation=attn)
    token_map = add_image_tokens(tok, model, codes_info["n_embed"], codes_info["grid_size"], codes_info["fingerprint"])
    torch.manual_seed(seed)  # LoRA A matrices are drawn at random
    model = apply_lora(model, token_map, lora)
    return model, tok, token_map


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenised_examples(data: str, tok, token_map, stage, template: str, max_length: int, n_examples: int, seed: int):
    """The first ``n_examples`` training examples of the stage, built in memory (no cache files in ``data``)."""
    import datasets

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.train.examples import build_stage_dataset

    ds = load_dataset(data)
    per_study = max(1, (stage.report + stage.image + stage.vqa) * stage.repeats)
    want = math.ceil(n_examples / per_study * 1.25) + 8  # VQA can give fewer questions than asked
    train_rows = [i for i, s in enumerate(ds["split"]) if s == "train"][:want]
    keep = [c for c in ("id", "patient_id", "report", "findings", "labels", "codes", "source") if c in ds.column_names]
    studies = datasets.Dataset.from_dict(ds.select_columns(keep)[train_rows])  # in memory: map writes no cache
    out = build_stage_dataset(studies, tok, token_map, stage, template, max_length, seed, progress=False)
    if len(out) < n_examples:
        print(f"note: only {len(out)} examples from {len(studies)} studies (asked for {n_examples})", flush=True)
    return out.select(range(min(n_examples, len(out))))


# --------------------------------------------------------------------------- instrument


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process): what others ran is the difference."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v[:8]) - v[3] - v[4]  # everything but idle and iowait
    with open("/proc/self/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return busy, int(s[11]) + int(s[12])  # utime + stime


class Meter:
    """Real and padded tokens of each training forward, and the time at the end of each optimizer step."""

    def __init__(self, model):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.batches: list[tuple[int, int]] = []  # (real tokens, B*T)
        self.step_end: list[float] = []
        self.ticks: list[tuple[int, int]] = []
        self._h = [model.register_forward_pre_hook(self._forward, with_kwargs=True),
                   register_optimizer_step_post_hook(self._step)]

    def _forward(self, module, args, kwargs):
        if module.training:
            m = kwargs.get("attention_mask")
            self.batches.append((int(m.sum()), m.numel()))

    def _step(self, opt, args, kwargs):
        self.step_end.append(time.perf_counter())
        self.ticks.append(_cpu_ticks() if os.path.exists("/proc/stat") else (0, 0))

    def close(self) -> None:
        for h in self._h:
            h.remove()

    def result(self, steps: int, warmup: int) -> dict:
        if len(self.step_end) != steps or len(self.batches) != steps:
            raise RuntimeError(f"expected {steps} optimizer steps and forwards, saw {len(self.step_end)} and "
                               f"{len(self.batches)}")
        seconds = self.step_end[steps - 1] - self.step_end[warmup - 1]
        timed = self.batches[warmup:steps]
        real = sum(r for r, _ in timed)
        total = sum(t for _, t in timed)
        per_step = [self.batches[i][0] / (self.step_end[i] - self.step_end[i - 1]) for i in range(warmup, steps)]
        hz = os.sysconf("SC_CLK_TCK")
        (b0, s0), (b1, s1) = self.ticks[warmup - 1], self.ticks[steps - 1]
        return {"timed_steps": steps - warmup, "seconds": seconds, "real_tokens": real, "padded_positions": total,
                "tokens_per_s": real / seconds, "s_per_step": seconds / (steps - warmup),
                "median_step_tokens_per_s": float(np.median(per_step)), "padding_fraction": 1 - real / total,
                "own_cores": (s1 - s0) / hz / seconds, "other_cores": max(0.0, (b1 - b0 - (s1 - s0)) / hz / seconds)}


# --------------------------------------------------------------------------- the runs


def run_ours(make, train_ds, pad_id: int, args, mixed_precision: str, lr: float, warmup_lr: int) -> dict:
    from llm_cxr.accel import make_accelerator
    from llm_cxr.train.config import LoopConfig
    from llm_cxr.train.loop import train_loop

    model, digest = make()
    accelerator = make_accelerator(mixed_precision)
    cfg = LoopConfig(steps=args.steps, batch_size=args.batch_size, mixed_precision=mixed_precision, eval_every=0,
                     save_every=10**9, log_every=10**9, lr=lr, warmup_steps=warmup_lr, seed=args.seed, progress=False)
    meter = Meter(model)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-lm-ours-") as tmp:
            train_loop(model, train_ds, None, pad_id, cfg, Path(tmp), accelerator)
    finally:
        meter.close()
    return {"init_weights": digest, **meter.result(args.steps, args.warmup)}


class PadToLongest:
    """Baseline collator: right-pad to the longest sequence of the batch (llm-cxr's collate, no rounding up)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        from llm_cxr.train.batching import collate

        return collate(feats, self.pad_id, pad_to_multiple=1)


def run_trainer(make, train_ds, pad_id: int, args, lr: float, warmup_lr: int, use_cpu: bool = True,
                bf16: bool = False) -> dict:
    """The plain Trainer baseline; ``use_cpu=False`` lets it take the GPU, ``bf16`` its bf16 autocast."""
    from transformers import Trainer, TrainingArguments

    model, digest = make()
    rows = [{"input_ids": a, "n_prompt": n} for a, n in zip(train_ds["input_ids"], train_ds["n_prompt"])]
    meter = Meter(model)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-lm-trainer-") as tmp:
            targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                      learning_rate=lr, warmup_steps=warmup_lr, max_grad_norm=1.0, bf16=bf16,
                                      fp16=False, use_cpu=use_cpu, train_sampling_strategy="random",
                                      eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                                      remove_unused_columns=False, seed=args.seed)
            trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=PadToLongest(pad_id))
            trainer.train()
            optim = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                         else trainer.optimizer).__name__
    finally:
        meter.close()
    return {"init_weights": digest, "optimizer": f"{optim} ({targs.optim})", **meter.result(args.steps, args.warmup)}


# --------------------------------------------------------------------------- padding over whole epochs


def epoch_padding(lengths: np.ndarray, batch: int, epochs: int = 5) -> dict[str, float]:
    """Padding share of a whole epoch (mean over ``epochs`` seeds) for each batching method, from lengths alone."""
    from llm_cxr.train.batching import LengthGroupedBatches

    def share(batches, multiple: int) -> float:
        real = total = 0
        for b in batches:
            L = lengths[b]
            T = -(-int(L.max()) // multiple) * multiple
            real += int(L.sum())
            total += T * len(b)
        return 1 - real / total

    out = {"grouped, pad to 8 (ours)": [], "random, pad to longest (baseline)": [], "random, pad to 8": []}
    for s in range(epochs):
        out["grouped, pad to 8 (ours)"].append(share(LengthGroupedBatches(lengths, batch, seed=s).epoch(0), 8))
        perm = np.random.default_rng(s).permutation(len(lengths))
        rand = [perm[i:i + batch] for i in range(0, len(perm) - batch + 1, batch)]
        out["random, pad to longest (baseline)"].append(share(rand, 1))
        out["random, pad to 8"].append(share(rand, 8))
    return {k: float(np.mean(v)) for k, v in out.items()}


# --------------------------------------------------------------------------- main


ROWS = {"baseline": "Trainer fp32, random batches, pad to longest (SDPA, transformers' default)",
        "ours": "llm-cxr train_loop bf16, length-grouped, attention as train_lm picks it",
        "ours_fp32": "llm-cxr train_loop fp32, length-grouped, attention as train_lm picks it",
        # ablation rows: the attention kernel alone
        "ours_sdpa": "ablation: ours with SDPA attention",
        "baseline_eager": "ablation: baseline with eager attention"}


def row_attention(row: str, mixed_precision: str) -> str:
    """The attention kernel a row loads: the baseline keeps transformers' default (SDPA); ours is
    what ``train_lm`` picks (``pick_attention``: eager for bf16 on CPU)."""
    from llm_cxr.train.lora import pick_attention

    if row.endswith("_eager"):
        return "eager"
    if row.endswith("_sdpa") or row.startswith("baseline"):
        return "sdpa"
    return pick_attention("auto", "cpu", mixed_precision)


def _setup(args):
    """(training config, stage, codes info, tokenizer, tokenised examples): the same in every process."""
    import datasets
    import transformers

    from llm_cxr.train.config import load_lm_config
    from llm_cxr.vqgan.encode import read_codes_info

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = load_lm_config(args.config, data=args.data, out="unused", base=args.base)
    stage = parse_stage_mix(args.stage_mix)
    codes_info = read_codes_info(args.data)
    _, tok, token_map = make_model(args.base, codes_info, cfg.lora, args.seed)
    train_ds = tokenised_examples(args.data, tok, token_map, stage, cfg.template, cfg.max_length, args.examples,
                                  args.seed)
    return cfg, stage, codes_info, tok, train_ds


def child(args) -> dict:
    """One row, measured in this (fresh) process."""
    cfg, _, codes_info, tok, train_ds = _setup(args)

    mp = {"ours": "bf16", "ours_fp32": "no", "ours_sdpa": "bf16"}.get(args.child, "no")
    attn = row_attention(args.child, mp)

    def make():
        model, _, _ = make_model(args.base, codes_info, cfg.lora, args.seed, attn)
        return model, weights_digest(model)

    lr, warmup_lr = cfg.loop.lr, cfg.loop.warmup_steps
    if args.child.startswith("baseline"):
        return {"attention": attn, **run_trainer(make, train_ds, tok.pad_token_id, args, lr, warmup_lr)}
    return {"attention": attn, **run_ours(make, train_ds, tok.pad_token_id, args, mp, lr, warmup_lr)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/synth-20k-codes", help="dataset with a `codes` column")
    ap.add_argument("--base", default="runs/lm-base-small/model", help="base causal LM (hub name or folder)")
    ap.add_argument("--config", default="llm_cxr/train/presets/small_stage1.yaml",
                    help="training config whose lora, template, max_length, lr and warm-up are used")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=2000, help="tokenised training examples")
    ap.add_argument("--stage-mix", default=None,
                    help="StageConfig fields, e.g. report=1,image=1,vqa=2 (default: StageConfig())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="baseline,ours,ours_fp32,ours_sdpa,baseline_eager",
                    help=f"which rows to measure, of {list(ROWS)}")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measure every row this many times (order rotated each round); the best round counts "
                         "(default 2, 1 with --quick)")
    ap.add_argument("--max-minutes", type=float, default=8.0, help="start no further round after this long")
    ap.add_argument("--results-dir", default=None,
                    help="where NAME.json/.md go (default benchmarks/results; with --quick a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (5 steps, batch 4, 64 examples, 1 round)")
    ap.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.examples, args.warmup = 5, 4, 64, 2
    args.rounds = args.rounds or (1 if args.quick else 2)
    if not 0 < args.warmup < args.steps:
        raise SystemExit("--warmup must be between 1 and --steps - 1")
    os.chdir(REPO)
    if args.child:
        warnings.filterwarnings("ignore", category=FutureWarning)
        Path(args.child_out).write_text(json.dumps(child(args)))
        return 0
    if args.results_dir:
        common.RESULTS = Path(args.results_dir)
    elif args.quick:  # smoke numbers never land in benchmarks/results
        common.RESULTS = Path(tempfile.gettempdir()) / "llm-cxr-bench-quick"
    rows_wanted = args.runs.split(",")
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"--runs: unknown rows {unknown}; choose from {list(ROWS)}")

    import datasets
    import transformers

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    cfg, stage, _, _, train_ds = _setup(args)
    lengths = np.asarray(train_ds["length"])
    tasks = {str(k): int(v) for k, v in zip(*np.unique(list(train_ds["task"]), return_counts=True))}
    print(f"{len(train_ds)} examples {tasks}, length mean {lengths.mean():.0f} min {lengths.min()} max "
          f"{lengths.max()}; {torch.get_num_threads()} threads", flush=True)

    # every row in its own process (no state carried between them), order rotated each round
    passthrough = [a for a in sys.argv[1:] if a != "--quick"] + (
        ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--examples", str(args.examples),
         "--warmup", str(args.warmup)] if args.quick else [])
    measured: dict[str, list[dict]] = {r: [] for r in rows_wanted}
    round_s = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
        for rnd in range(args.rounds):
            elapsed = (time.perf_counter() - t0) / 60
            if rnd and elapsed + round_s / 60 > args.max_minutes:
                print(f"stopping after {rnd} rounds ({elapsed:.1f} min; --max-minutes {args.max_minutes})")
                break
            t_round = time.perf_counter()
            order = rows_wanted[rnd % len(rows_wanted):] + rows_wanted[:rnd % len(rows_wanted)]
            for name in order:
                out = Path(tmp) / f"{name}-{rnd}.json"
                print(f"== round {rnd + 1}, {name}: {ROWS[name]}", flush=True)
                subprocess.run([sys.executable, __file__, *passthrough, "--child", name, "--child-out", str(out)],
                               check=True)
                r = json.loads(out.read_text()) | {"round": rnd + 1}
                measured[name].append(r)
                print(f"   {r['tokens_per_s']:.0f} tokens/s (median step {r['median_step_tokens_per_s']:.0f}), "
                      f"{r['s_per_step']:.3f} s/step, padding {r['padding_fraction']:.3f}, other processes "
                      f"{r['other_cores']:.2f} cores", flush=True)
            round_s = time.perf_counter() - t_round
    digests = {r["init_weights"] for rs in measured.values() for r in rs}
    if len(digests) != 1:
        raise RuntimeError(f"the runs did not start from the same weights: {digests}")

    best = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in measured.items()}
    base_tps = best["baseline"]["tokens_per_s"] if "baseline" in best else None
    rows = [{"row": name, "setup": ROWS[name], "attention": r.get("attention"), "tokens_per_s": r["tokens_per_s"],
             "tokens_per_s_all_rounds": " / ".join(f"{x['tokens_per_s']:.0f}" for x in measured[name]),
             "s_per_step": r["s_per_step"], "padding_fraction": r["padding_fraction"],
             "other_cores_busy": r["other_cores"],
             "vs_baseline": r["tokens_per_s"] / base_tps if base_tps else None} for name, r in best.items()]
    speedup = best["ours"]["tokens_per_s"] / base_tps if base_tps and "ours" in best else None
    split = {}
    if {"baseline", "ours", "ours_fp32"} <= best.keys():
        split = {"bf16_over_fp32": best["ours"]["tokens_per_s"] / best["ours_fp32"]["tokens_per_s"],
                 "ours_fp32_over_baseline": best["ours_fp32"]["tokens_per_s"] / base_tps}
    if {"ours", "ours_sdpa"} <= best.keys():
        split["attention_choice_over_sdpa"] = best["ours"]["tokens_per_s"] / best["ours_sdpa"]["tokens_per_s"]
    if {"ours", "baseline_eager"} <= best.keys():
        split["ours_over_eager_baseline"] = best["ours"]["tokens_per_s"] / best["baseline_eager"]["tokens_per_s"]
    pad_epoch = epoch_padding(lengths, args.batch_size)
    load_after = os.getloadavg()
    data = {"settings": {"data": args.data, "base": args.base, "config": args.config, "steps": args.steps,
                         "warmup_steps_excluded": args.warmup, "batch_size": args.batch_size,
                         "examples": len(train_ds), "tasks": tasks, "stage": asdict(stage), "lora": asdict(cfg.lora),
                         "template": cfg.template, "max_length": cfg.max_length, "seed": args.seed,
                         "rounds": len(next(iter(measured.values()))), "torch_threads": torch.get_num_threads(),
                         "quick": args.quick, "length_mean": float(lengths.mean()), "length_min": int(lengths.min()),
                         "length_max": int(lengths.max())},
            "versions": {"transformers": transformers.__version__, "datasets": datasets.__version__,
                         "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__},
            "init_weights_identical": True, "init_weights": digests.pop(),
            "best": best, "all_rounds": measured, "speedup_ours_over_baseline": speedup, "target": TARGET,
            "target_met": bool(speedup is not None and speedup >= TARGET), "speedup_split": split,
            "epoch_padding_fraction": pad_epoch, "load_average_before_after": [load_before[0], load_after[0]],
            "wall_minutes": (time.perf_counter() - t0) / 60}
    notes = ""
    if speedup:
        notes = (f"{len(train_ds)} stage examples ({', '.join(f'{k} {v}' for k, v in tasks.items())}; length mean "
                 f"{lengths.mean():.0f}, {lengths.min()}-{lengths.max()} tokens) from {args.data}, base {args.base}, "
                 f"LoRA r={cfg.lora.r} from {args.config}; batch {args.batch_size}, {args.steps} steps per "
                 f"measurement, the first {args.warmup} not timed; every row in its own process, "
                 f"{data['settings']['rounds']} rounds in rotated order, the best round shown; tokens = real "
                 f"(non-pad) tokens; same initial weights in every row. other_cores_busy: CPU that other processes "
                 f"used during the timed steps (the machine has {os.cpu_count()} cores). Speed-up ours/baseline: "
                 f"**{speedup:.2f}x** (target >= {TARGET}x: {'met' if data['target_met'] else 'NOT met'})")
        if split:
            notes += (f"; bf16 over fp32 {split['bf16_over_fp32']:.2f}x, ours fp32 over baseline "
                      f"{split['ours_fp32_over_baseline']:.2f}x")
        if "attention_choice_over_sdpa" in split:
            notes += (f"; ours loads {best['ours'].get('attention')} attention (train_lm's choice for bf16 on CPU: "
                      f"the SDPA kernel gains nothing from bf16), {split['attention_choice_over_sdpa']:.2f}x ours "
                      f"with SDPA")
        if "ours_over_eager_baseline" in split:
            notes += f"; against a baseline also on eager attention ours is {split['ours_over_eager_baseline']:.2f}x"
        notes += f". Load average {load_before[0]:.1f} before / {load_after[0]:.1f} after."
    tables = [(f"Training tokens/s, {torch.get_num_threads()} threads (target: ours >= {TARGET}x baseline)", rows),
              ("Padding share of a whole epoch by batching method (mean of 5 shuffles)",
               [{"batching": k, "padding_fraction": v} for k, v in pad_epoch.items()])]
    common.write_results("lm_train", "Language-model training speed", data, tables, notes)
    print(f"written to {common.RESULTS} in {data['wall_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
