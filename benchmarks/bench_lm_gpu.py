"""Training and generation on a CUDA GPU (issue 4): a Pythia-sized GPT-NeoX with random weights, and a trained run.

Two steps, because the GPU machine may not hold the dataset:

    # 1. here (any machine, CPU is fine): a small folder with everything the GPU run reads
    python benchmarks/bench_lm_gpu.py pack --data runs/synth-20k-codes --base runs/lm-base-small/model \\
        --run runs/lm-small-s2p --vqgan runs/vqgan-small-feat --classifier runs/classifier-eval --out runs/gpu-pack
    # 2. on the GPU machine
    python benchmarks/bench_lm_gpu.py measure --pack runs/gpu-pack [--size pythia-1b] [--parts train,generate,run]

``pack`` writes tokenised stage-1 examples (the same ``build_stage_dataset`` training uses, from the small stage-1
config), the tokenizer extended with the image tokens, and, for the ``run`` part, the trained run's model folder,
its VQ-GAN and finding classifier and the test studies ``llm-cxr evaluate`` would draw (``n`` of them, seed 0).

``measure`` (needs CUDA):

- **train**: a GPT-NeoX of the named Pythia size, random weights, with the image tokens, trained by
  ``llm_cxr.train.loop.train_loop`` as ``llm-cxr train`` runs it (bf16 autocast through accelerate, length-grouped
  batches, SDPA attention as ``pick_attention`` chooses on CUDA), with LoRA (the small preset's settings: r=64 on
  attention and MLP, image-token rows trainable) and with full fine-tuning; beside them the plain Trainer baseline of
  ``bench_lm_train.py`` (random batches, pad to longest), in fp32 and in bf16. Tokens/s counts real tokens over the
  timed steps. **Model FLOPs utilisation** = model FLOPs per second / the GPU's dense bf16 peak from its datasheet
  (989 TFLOP/s for H100 SXM and H200), and also over the bf16 matrix-product rate measured on this GPU. Model FLOPs
  per token follow PaLM's appendix B: 6N + 12·L·d·n for full fine-tuning (N = weights of the linear layers, output
  head included; n = mean sequence length), and 4N + 6·N_LoRA + 12·L·d·n for LoRA, whose frozen weights need no
  weight gradients (a 6N count would flatter it by half as much again).
  Ablation rows take LoRA's dropout, or its trainable image-token rows, away.
- **profile**: torch.profiler over optimizer steps 4-6 of a LoRA and a full step: GPU time by op.
- **generate**: the same random model through ``LLMCXR`` (KV cache, constrained decoding), with fp32 weights under
  bf16 autocast and with bf16 weights (``--gen-weights``): images (exactly H·W tokens each) and reports (160 new
  tokens: random weights rarely stop early) per minute by batch size, and milliseconds per decode step.
- **run**: the trained run on CUDA, with both kinds of weights: reports, VQA and images scored exactly as
  ``bench_lm_quality.py`` scores them on the CPU (the same test studies), to show the CUDA path gives the same
  quality, and how fast (after an untimed warm-up).

Every part's results are written as soon as it ends, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# GPT-NeoX shapes of the Pythia suite (Biderman et al. 2023); vocabulary padded to 50,304 rows
PYTHIA = {"pythia-160m": (768, 12, 12, 3072), "pythia-410m": (1024, 24, 16, 4096), "pythia-1b": (2048, 16, 8, 8192),
          "pythia-1.4b": (2048, 24, 16, 8192), "pythia-2.8b": (2560, 32, 32, 10240)}
PYTHIA_VOCAB = 50304
# lm_eval draws each direction's test studies with seed + 0 (reports), + 1 (images), + 2 (VQA)
SUBSETS = {"reports": 0, "images": 1, "vqa": 2}
# dense bf16 matrix peak from the datasheets (no sparsity), TFLOP/s
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "A100": 312.0}


# --------------------------------------------------------------------------- pack (CPU)


def pack(args) -> int:
    import datasets
    from bench_lm_train import make_model, tokenised_examples

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.evaluation.lm_eval import _take
    from llm_cxr.train.config import load_lm_config
    from llm_cxr.vqgan.encode import read_codes_info

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = load_lm_config(args.config, data=args.data, out="unused", base=args.base)
    info = read_codes_info(args.data)
    _, tok, token_map = make_model(args.base, info, cfg.lora, 0)
    ex = tokenised_examples(args.data, tok, token_map, cfg.stage, cfg.template, cfg.max_length, args.examples, 0)
    ex.select_columns(["input_ids", "n_prompt", "length", "task"]).save_to_disk(str(out / "examples"))
    tok.save_pretrained(out / "tokenizer")
    token_map.save(out / "tokenizer")
    (out / "pack.json").write_text(json.dumps({"codes_info": info, "lora": vars(cfg.lora), "template": cfg.template,
                                               "max_length": cfg.max_length, "config": args.config,
                                               "data": args.data, "base": args.base, "run": args.run}, indent=2))
    if args.run:
        from llm_cxr.lm.run import model_dir

        shutil.copytree(model_dir(args.run), out / "run" / "model")
        vq = Path(args.vqgan) / "model" if (Path(args.vqgan) / "model").exists() else Path(args.vqgan)
        shutil.copytree(vq, out / "vqgan")
        shutil.copytree(args.classifier, out / "classifier", ignore=shutil.ignore_patterns("checkpoints"))
        test = load_dataset(args.data, split="test")
        keep = ["id", "patient_id", "split", "report", "findings", "labels", "codes"]
        for what, seed in SUBSETS.items():  # the studies `llm-cxr evaluate` draws for each direction (seed 0)
            sub = _take(test, args.n, seed)
            datasets.Dataset.from_dict(sub.select_columns(keep)[:]).save_to_disk(str(out / f"test_{what}"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {len(ex)} examples{' and the run' if args.run else ''} into {out} ({size / 2**20:.1f} MiB)")
    return 0


# --------------------------------------------------------------------------- model and FLOPs


def pythia_model(size: str, tok, token_map, attn: str = "sdpa", seed: int = 0):
    """A GPT-NeoX of Pythia's shape with random weights (fp32, on the GPU), extended with the image tokens.

    The tokenizer is the pack's (report text), so the image tokens take rows inside Pythia's 50,304; the model has
    exactly Pythia's parameter count."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from llm_cxr.lm.tokens import add_image_tokens

    d, layers, heads, ff = PYTHIA[size]
    cfg = GPTNeoXConfig(vocab_size=PYTHIA_VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ff, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    add_image_tokens(tok, model, token_map.n_codes, token_map.grid_size, token_map.vqgan_fingerprint)
    return model


def linear_params(model) -> tuple[int, int]:
    """(weights of the base model's linear layers incl. the output head, weights of the LoRA adapters)."""
    base = lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            n = m.weight.numel()
            if ".lora_" in name:
                lora += n
            else:
                base += n
    return base, lora


def flops_per_token(model, mode: str, mean_len: float) -> float:
    c = model.config
    base, lora = linear_params(model)
    attn = 12 * c.num_hidden_layers * c.hidden_size * mean_len
    return (6 * base if mode == "full" else 4 * base + 6 * lora) + attn


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / float(np.median(times)) / 1e12


def _free():
    """Release the last row's model, optimizer and accelerate state (rows share one process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _maker(args, tok, token_map, mode: str, lora, attn: str = "sdpa"):
    """A function making a fresh model for one row: full fine-tuning (every weight trains) or ``lora``."""
    from bench_lm_train import weights_digest

    from llm_cxr.train.lora import apply_lora

    def make():
        model = pythia_model(args.size, tok, token_map, attn)
        if mode == "lora":
            torch.manual_seed(0)  # LoRA A matrices are drawn at random
            model = apply_lora(model, token_map, lora)
        return model, weights_digest(model) if args.digest else "-"

    return make


# --------------------------------------------------------------------------- parts


ROWS = {"ours_lora": "llm-cxr train_loop, LoRA, bf16, length-grouped, SDPA",
        "ours_full": "llm-cxr train_loop, full fine-tuning, bf16, length-grouped, SDPA",
        "baseline_lora_fp32": "Trainer, LoRA, fp32, random batches, pad to longest",
        "baseline_lora_bf16": "Trainer, LoRA, bf16, random batches, pad to longest",
        # ablations (first batch size only): what LoRA's extras cost
        "ablation_lora_nodropout": "ours_lora with lora dropout 0",
        "ablation_lora_notokens": "ours_lora without trainable image-token rows"}


def part_train(args, packed: dict, tok, token_map, ex, peak: float | None, measured_peak: float) -> list[dict]:
    from bench_lm_train import run_ours, run_trainer

    from llm_cxr.train.lora import LoraSettings, pick_attention

    mean_len = float(np.mean(ex["length"]))
    attn = pick_attention("auto", "cuda", "bf16")
    rows = []
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r}; choose from {list(ROWS)}")
        mode = "full" if name.endswith("full") else "lora"
        lora = LoraSettings(**{**packed["lora"], **({"dropout": 0.0} if name.endswith("nodropout") else {}),
                               **({"train_new_tokens": False} if name.endswith("notokens") else {})})
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        for bs in sizes if name.startswith("ours") else sizes[:1]:
            _free()
            make = _maker(args, tok, token_map, mode, lora, attn)
            ns = types.SimpleNamespace(steps=args.steps, warmup=args.warmup, batch_size=bs, seed=0)
            holder = {}

            def make_and_count():
                m, dg = make()
                holder["fpt"] = flops_per_token(m, mode, mean_len)
                holder["params"] = sum(p.numel() for p in m.parameters())
                holder["trainable"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
                return m, dg

            t0 = time.perf_counter()
            try:
                if not name.startswith("baseline"):
                    r = run_ours(make_and_count, ex, tok.pad_token_id, ns, "bf16", 2e-4, 20)
                else:
                    r = run_trainer(make_and_count, ex, tok.pad_token_id, ns, 2e-4, 20, use_cpu=False,
                                    bf16=name.endswith("bf16"))
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                kind = "out of GPU memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"
                print(f"{name} batch {bs}: FAILED, {kind}", flush=True)
                traceback.print_exc()
                rows.append({"row": name, "setup": ROWS[name], "batch": bs, "error": kind[:300]})
                continue
            mem = torch.cuda.max_memory_allocated() / 2**30
            tflops = r["tokens_per_s"] * holder["fpt"] / 1e12
            row = {"row": name, "setup": ROWS[name], "batch": bs, "trainable": holder["trainable"],
                   "trainable_share": holder["trainable"] / holder["params"], "tokens_per_s": r["tokens_per_s"],
                   "s_per_step": r["s_per_step"], "padding_fraction": r["padding_fraction"],
                   "model_tflops": tflops, "mfu_datasheet": tflops / peak if peak else None,
                   "mfu_measured_peak": tflops / measured_peak, "peak_gib": mem,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name} batch {bs}: {r['tokens_per_s']:.0f} tokens/s, {r['s_per_step'] * 1e3:.0f} ms/step, "
                  f"{tflops:.0f} model TFLOP/s, MFU {row['mfu_datasheet'] or float('nan'):.3f} (datasheet) "
                  f"{row['mfu_measured_peak']:.3f} (measured), {mem:.1f} GiB, padding {r['padding_fraction']:.3f}",
                  flush=True)
    _free()
    return rows


def part_profile(args, packed: dict, tok, token_map, ex) -> dict:
    """Where a training step's GPU time goes, LoRA against full fine-tuning (torch.profiler, steps 4-6 of 8)."""
    from bench_lm_train import run_ours

    from llm_cxr.train.lora import LoraSettings

    out = {}
    for mode in ("lora", "full"):
        _free()
        make = _maker(args, tok, token_map, mode, LoraSettings(**packed["lora"]))
        ns = types.SimpleNamespace(steps=8, warmup=3, batch_size=int(args.batch_sizes.split(",")[0]), seed=0)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        # record optimizer steps 4-6 only: not the model's creation, not the checkpoint written at the end
        sched = torch.profiler.schedule(wait=2, warmup=1, active=3, repeat=1)
        with torch.profiler.profile(activities=acts, schedule=sched) as prof:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            hook = register_optimizer_step_post_hook(lambda *a, **k: prof.step())
            try:
                r = run_ours(make, ex, tok.pad_token_id, ns, "bf16", 2e-4, 20)
            finally:
                hook.remove()
        avg = prof.key_averages()
        total = sum(e.self_device_time_total for e in avg) / 1e3
        top = sorted(avg, key=lambda e: e.self_device_time_total, reverse=True)[:args.profile_top]
        out[mode] = {"s_per_step_profiled": r["s_per_step"], "gpu_ms_3_steps": total,
                     "top": [{"op": e.key[:90], "calls": e.count, "gpu_ms": e.self_device_time_total / 1e3,
                              "share": e.self_device_time_total / 1e3 / max(total, 1e-9)} for e in top]}
        print(f"profile {mode}: {r['s_per_step'] * 1e3:.0f} ms/step under the profiler, GPU busy {total:.0f} ms "
              f"over steps 4-6", flush=True)
        for t in out[mode]["top"]:
            print(f"  {t['gpu_ms']:8.1f} ms {t['share']:6.1%} {t['calls']:6d}x {t['op']}", flush=True)
    _free()
    return out


def part_generate(args, packed: dict, tok, token_map, pack_dir: Path) -> list[dict]:
    import datasets

    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.lm.run import LoadedRun, RunInfo

    reports = (datasets.load_from_disk(str(pack_dir / "test_images"))["report"] if (pack_dir / "test_images").exists()
               else ["Small right pleural effusion. No pneumothorax."])
    rows = []
    for weights in args.gen_weights.split(","):
        _free()
        model = pythia_model(args.size, tok, token_map, "sdpa")
        with tempfile.TemporaryDirectory() as empty:  # no finding head: plain generation
            info = RunInfo(kind="full", base=f"random {args.size}", vqgan=None, template=packed["template"],
                           max_length=1024)
            bf16 = weights == "bf16"  # else fp32 weights under bf16 autocast
            m = LLMCXR(LoadedRun(model, tok, token_map, info, Path(empty)), None, "cuda",
                       autocast=None if bf16 else True, dtype=torch.bfloat16 if bf16 else None)
            for what in ("image", "report"):
                for bs in [int(b) for b in args.gen_batch_sizes.split(",")]:
                    n = max(bs, args.gen_n if bs > 1 else min(args.gen_n, 4))
                    asks = [reports[i % len(reports)] for i in range(n)]
                    codes = torch.randint(0, token_map.n_codes, (n, token_map.tokens_per_image))

                    def gen(k: int):
                        if what == "image":
                            return m.generate_image(asks[:k], batch_size=bs)
                        return m.generate_report(codes[:k], batch_size=bs, max_new_tokens=160)

                    gen(bs)  # warm-up (kernels, allocator)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t = time.perf_counter()
                    out = gen(n)
                    torch.cuda.synchronize()
                    sec = time.perf_counter() - t
                    if what == "image":
                        assert out.codes.shape == (n, token_map.grid_size, token_map.grid_size)
                        new_tokens = n * token_map.tokens_per_image
                    else:
                        new_tokens = sum(len(tok(x)["input_ids"]) for x in out)
                    steps = -(-n // bs) * (token_map.tokens_per_image if what == "image" else 160)
                    rows.append({"task": "report -> image" if what == "image" else "image -> report",
                                 "weights": weights, "batch": bs, "n": n, "per_minute": n / sec * 60,
                                 "new_tokens_per_s": new_tokens / sec, "ms_per_decode_step": sec / steps * 1e3,
                                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
                    print(f"generate {what} ({weights}) batch {bs}: {n / sec * 60:.0f}/min, "
                          f"{new_tokens / sec:.0f} new tokens/s, {sec / steps * 1e3:.1f} ms/step", flush=True)
        m = model = None
    _free()
    return rows


def part_run(args, pack_dir: Path, dtype: torch.dtype | None = None) -> dict:
    import datasets

    from llm_cxr.evaluation.lm_eval import (
        EvalConfig,
        evaluate_images,
        evaluate_reports,
        evaluate_vqa,
    )
    from llm_cxr.lm.generation import LLMCXR

    _free()
    ds = {w: datasets.load_from_disk(str(pack_dir / f"test_{w}")) for w in SUBSETS}
    model = LLMCXR.from_pretrained(pack_dir / "run", vqgan=pack_dir / "vqgan", device="cuda",
                                   autocast=True if dtype is None else None, dtype=dtype)
    n = len(ds["reports"])
    warm = torch.as_tensor(ds["reports"].with_format("numpy")[:2]["codes"]).long()
    model.generate_report(warm, findings=[[], []], max_new_tokens=8)  # CUDA context, kernels, allocator: untimed
    model.generate_image(ds["images"]["report"][:2])
    # n = the subset's size: lm_eval's _take then samples every index and sorts them, so each direction sees exactly
    # the rows it draws from the whole test split on the CPU (pack saved them with the same seeds)
    cfg = EvalConfig(n_reports=n, n_images=n, n_vqa_images=n, batch_size=args.run_batch, progress=False)
    t = time.perf_counter()
    rep = evaluate_reports(model, ds["reports"], cfg)
    vqa = evaluate_vqa(model, ds["vqa"], cfg)
    t_img = time.perf_counter()
    img = evaluate_images(model, ds["images"], str(pack_dir / "classifier"), cfg)
    t_best = time.perf_counter()
    best = (evaluate_images(model, ds["images"], str(pack_dir / "classifier"),
                            EvalConfig(n_images=n, batch_size=args.run_batch, candidates=4, progress=False))
            if model.finding_head is not None else None)
    t_end = time.perf_counter()
    out = {"weights": "bf16" if dtype == torch.bfloat16 else "fp32 + bf16 autocast", "n": n,
           "batch_size": args.run_batch, "report_clinical_micro_f1": rep["micro_f1"],
           "report_laterality_accuracy": rep["laterality_accuracy"],
           "report_reading_micro_f1": rep.get("reading", {}).get("micro_f1"),
           "report_writer_micro_f1_given_truth": rep.get("writer_given_truth", {}).get("micro_f1"),
           "vqa_accuracy": vqa["accuracy_yes_no_laterality"], "checklist_micro_f1": vqa["checklist"]["micro_f1"],
           "image_finding_micro_f1": img["micro_f1"], "valid_image_rate": img["valid_image_rate"],
           "image_finding_micro_f1_best_of_4": best["micro_f1"] if best else None,
           "reports_per_minute": n / rep["seconds"] * 60, "images_per_minute": n / (t_best - t_img) * 60,
           "images_per_minute_best_of_4": n / (t_end - t_best) * 60 if best else None,
           "seconds_all": t_end - t}
    print("trained run on CUDA:", json.dumps(out), flush=True)
    return out


def measure(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("measure needs a CUDA GPU (torch.cuda.is_available() is False); `pack` runs anywhere")
    import datasets
    import transformers

    from llm_cxr.lm.run import load_tokenizer
    from llm_cxr.lm.tokens import ImageTokenMap

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    pack_dir = Path(args.pack)
    if not (pack_dir / "pack.json").exists():
        raise SystemExit(f"{pack_dir} is not a pack (no pack.json): make one with `bench_lm_gpu.py pack`")
    packed = json.loads((pack_dir / "pack.json").read_text())
    tok = load_tokenizer(str(pack_dir / "tokenizer"))
    token_map = ImageTokenMap.load(pack_dir / "tokenizer")
    ex = datasets.load_from_disk(str(pack_dir / "examples"))
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    measured_peak = matmul_tflops()
    print(f"{gpu}: bf16 8192^3 matrix product {measured_peak:.0f} TFLOP/s (datasheet {peak}); torch "
          f"{torch.__version__}, transformers {transformers.__version__}; {len(ex)} examples, mean length "
          f"{np.mean(ex['length']):.0f}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows stay fp32 (transformers' default)
    parts = args.parts.split(",")
    if set(parts) - {"train", "generate", "run", "profile"}:
        raise SystemExit(f"--parts: choose from train, generate, run, profile (got {args.parts})")
    data = {"gpu": gpu, "size": args.size, "datasheet_bf16_tflops": peak, "measured_bf16_matmul_tflops": measured_peak,
            "examples": len(ex), "mean_length": float(np.mean(ex["length"])), "steps": args.steps,
            "warmup_steps_excluded": args.warmup, "pack": packed,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__}}
    tables = []
    t0 = time.perf_counter()
    d, layers, heads, ff = PYTHIA[args.size]
    common.RESULTS = Path(args.results_dir) if args.results_dir else common.RESULTS

    def write():  # after every part: a later part that fails or runs out of time loses nothing
        data["wall_minutes"] = (time.perf_counter() - t0) / 60
        notes = (f"GPT-NeoX of {args.size}'s shape (d={d}, {layers} layers, {heads} heads, MLP {ff}, vocabulary "
                 f"{PYTHIA_VOCAB}), random weights; {len(ex)} stage-1 examples from {packed['data']} (mean "
                 f"{data['mean_length']:.0f} tokens); {args.steps} steps per row, the first {args.warmup} not timed; "
                 f"tokens = real tokens. MFU: model FLOPs (full: 6N + 12·L·d·n; LoRA: 4N + 6·N_LoRA + 12·L·d·n) per "
                 f"second over the dense bf16 peak of the datasheet ({peak} TFLOP/s) and over the measured 8192³ "
                 f"bf16 matrix product ({measured_peak:.0f} TFLOP/s). Parts done: {', '.join(done)}.")
        common.write_results(args.name, f"GPU: training and generation ({gpu})", data, tables, notes)

    done: list[str] = []
    todo = {"train": lambda: part_train(args, packed, tok, token_map, ex, peak, measured_peak),
            "generate": lambda: part_generate(args, packed, tok, token_map, pack_dir),
            "profile": lambda: part_profile(args, packed, tok, token_map, ex),
            "run": lambda: ([part_run(args, pack_dir), part_run(args, pack_dir, torch.bfloat16)]
                            if (pack_dir / "run").exists() else None)}
    for part in parts:
        try:  # a part that fails is reported; the others still run and are written
            data[part] = todo[part]()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            data[part] = {"error": f"{type(e).__name__}: {e}"[:500]}
            tables.append((f"{part}: FAILED", [{"error": data[part]["error"]}]))
            done.append(f"{part} (failed)")
            write()
            continue
        if part == "train":
            tables.append((f"Training, {args.size} shape, random weights, {gpu}", data["train"]))
        elif part == "generate":
            tables.append((f"Generation, {args.size} shape, random weights, {gpu}", data["generate"]))
        elif part == "profile":
            for mode, prof in data[part].items():
                tables.append((f"Profile of a {mode} training step (batch {args.batch_sizes.split(',')[0]}): "
                               f"GPU time by op over optimizer steps 4-6", prof["top"]))
        elif data[part]:
            tables.append((f"Trained run {packed.get('run')} on {gpu}, {data['run'][0]['n']} test studies each",
                           data["run"]))
        done.append(part)
        write()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the folder the GPU run reads (runs anywhere)")
    p.add_argument("--data", default="runs/synth-20k-codes")
    p.add_argument("--base", default="runs/lm-base-small/model", help="its tokenizer is used")
    p.add_argument("--config", default="llm_cxr/train/presets/small_stage1.yaml", help="stage mix, LoRA, template")
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--run", default=None, help="a trained run to evaluate on the GPU (optional)")
    p.add_argument("--vqgan", default="runs/vqgan-small-feat")
    p.add_argument("--classifier", default="runs/classifier-eval")
    p.add_argument("--n", type=int, default=200, help="test studies for the run")
    p.add_argument("--out", default="runs/gpu-pack")
    m = sub.add_parser("measure", help="measure on a CUDA GPU")
    m.add_argument("--pack", default="runs/gpu-pack")
    m.add_argument("--size", default="pythia-1b", choices=list(PYTHIA))
    m.add_argument("--parts", default="train,generate,run")
    m.add_argument("--rows", default=",".join(ROWS), help=f"training rows, of {list(ROWS)}")
    m.add_argument("--batch-sizes", default="16,64", help="batch sizes of our rows (the baseline: the first)")
    m.add_argument("--steps", type=int, default=25)
    m.add_argument("--warmup", type=int, default=5)
    m.add_argument("--gen-batch-sizes", default="1,16,64")
    m.add_argument("--gen-n", type=int, default=64, help="requests per generation row (4 at batch 1)")
    m.add_argument("--gen-weights", default="fp32 + bf16 autocast,bf16",
                   help="LM weights for the generate part: 'fp32 + bf16 autocast' and/or 'bf16'")
    m.add_argument("--run-batch", type=int, default=64, help="batch size for the trained run")
    m.add_argument("--profile-top", type=int, default=15, help="ops listed by the profile part")
    m.add_argument("--digest", action="store_true", help="hash the initial weights (slow for big models)")
    m.add_argument("--name", default="lm_gpu")
    m.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    if args.cmd == "pack":
        return pack(args)
    if not 0 < args.warmup < args.steps:
        raise SystemExit("--warmup must be between 1 and --steps - 1")
    return measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
