"""Generation speed and validity against a baseline written the way LLM-CXR's pipeline works.

    python benchmarks/bench_generation.py --model runs/lm-small-s2 --data runs/synth-20k-codes [--n 32]

Baseline (LLM-CXR's inference): one request at a time through Hugging Face ``generate`` with
unconstrained sampling, stopping on the end key; the image tokens are then cut out of the
text, and a request whose count is not H*W (or that contains other tokens) yields no image.
Ours: :class:`llm_cxr.lm.generation.LLMCXR` at batch 1 and batch 16 with constrained decoding
(exactly H*W image tokens). Same merged model, same prompts, same machine, one run.
Targets: >= 4x images/min at batch 16 and a valid-image rate of 100%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def baseline_images(m, reports: list[str], max_new_tokens: int) -> tuple[float, float]:
    """(seconds, valid rate): one request at a time, unconstrained sampling, stop on EOS / end key."""
    from llm_cxr.lm.prompts import image_prompt
    from llm_cxr.lm.sequence import encode_prompt

    valid = 0
    t = time.perf_counter()
    for i, r in enumerate(reports):
        ids = encode_prompt(m.tok, m.map, image_prompt(m.template, r))[0]
        x = torch.tensor([ids])
        torch.manual_seed(i)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=m.autocast):
            out = m.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_p=0.95,
                                   max_new_tokens=max_new_tokens, eos_token_id=[m.tok.eos_token_id, m.map.end_id],
                                   pad_token_id=m.tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        if m.map.begin_id in new:
            new = new[new.index(m.map.begin_id) + 1:]
        if m.map.end_id in new:
            new = new[:new.index(m.map.end_id)]
        new = [t_ for t_ in new if t_ != m.tok.eos_token_id]
        ok = len(new) == m.map.tokens_per_image and bool(m.map.is_image_id(torch.tensor(new)).all())
        valid += ok
        if ok and m.vqgan is not None:
            m.vqgan.decode(m.map.ids_to_codes(torch.tensor(new))[None])
    return time.perf_counter() - t, valid / len(reports)


def baseline_reports(m, codes: torch.Tensor, max_new_tokens: int) -> float:
    from llm_cxr.lm.prompts import report_prompt
    from llm_cxr.lm.sequence import encode_prompt

    t = time.perf_counter()
    for i, c in enumerate(codes):
        ids = encode_prompt(m.tok, m.map, report_prompt(m.template), c.tolist())[0]
        x = torch.tensor([ids])
        torch.manual_seed(i)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=m.autocast):
            m.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_p=0.95,
                             max_new_tokens=max_new_tokens, eos_token_id=m.tok.eos_token_id,
                             pad_token_id=m.tok.pad_token_id)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="dataset with codes (test split reports and images)")
    ap.add_argument("--n", type=int, default=32, help="requests per configuration")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="report length limit (both sides)")
    args = ap.parse_args()

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.lm.generation import LLMCXR, Sampling

    m = LLMCXR.from_pretrained(args.model)
    ds = load_dataset(args.data, split="test").select(range(args.n))
    reports = list(ds["report"])
    codes = torch.as_tensor(ds.with_format("numpy")[:]["codes"]).long()
    samp = Sampling(temperature=1.0, top_p=0.95, seed=0)
    # warm-up
    m.generate_image(reports[:2], samp, batch_size=2)
    rows = []
    t_base, valid_base = baseline_images(m, reports, m.map.tokens_per_image + 64)
    rows.append({"task": "report -> image", "method": "baseline (LLM-CXR style, batch 1)",
                 "per_minute": args.n / t_base * 60, "valid_image_rate": valid_base})
    for bs in (1, 16):
        t = time.perf_counter()
        out = m.generate_image(reports, samp, batch_size=bs)
        dt = time.perf_counter() - t
        valid = sum(int(c.numel() == m.map.tokens_per_image) for c in out.codes) / args.n
        rows.append({"task": "report -> image", "method": f"llm-cxr constrained, batch {bs}",
                     "per_minute": args.n / dt * 60, "valid_image_rate": valid})
    t_rep = baseline_reports(m, codes, args.max_new_tokens)
    rows.append({"task": "image -> report", "method": "baseline (LLM-CXR style, batch 1)",
                 "per_minute": args.n / t_rep * 60, "valid_image_rate": None})
    for bs in (1, 16):
        t = time.perf_counter()
        m.generate_report(codes, Sampling(temperature=1.0, top_p=0.95, seed=0), max_new_tokens=args.max_new_tokens,
                          batch_size=bs)
        dt = time.perf_counter() - t
        rows.append({"task": "image -> report", "method": f"llm-cxr, batch {bs}", "per_minute": args.n / dt * 60,
                     "valid_image_rate": None})
    base_img = rows[0]["per_minute"]
    base_rep = rows[3]["per_minute"]
    for r in rows:
        r["speedup"] = r["per_minute"] / (base_img if r["task"] == "report -> image" else base_rep)
    data = {"model": args.model, "n": args.n, "rows": rows,
            "target_met": rows[2]["speedup"] >= 4 and rows[2]["valid_image_rate"] == 1.0,
            "device": str(m.device), "autocast_bf16": m.autocast}
    write_results("generation", "Generation speed and validity", data,
                  [(f"{args.n} requests each, same merged model and prompts (target: >= 4x images/min at batch 16, "
                    "100% valid images)", rows)])
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
