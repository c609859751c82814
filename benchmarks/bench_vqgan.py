"""VQ-GAN quality and speed (issue: image tokenizer).

    python benchmarks/bench_vqgan.py --run runs/vqgan-small --data runs/synth-4k \
        [--classifier runs/classifier] [--parts quality,speed,scaling,real]

quality: PSNR / SSIM / codebook usage of reconstructions of the test split, and the finding
         classifier's accuracy on originals against reconstructions;
speed:   encode images/s of our model against taming-transformers' reference modules with the
         same weights (fp32), ours in fp32 and with bf16 autocast + inference_mode; decode images/s;
scaling: `encode_dataset` seconds for 1k, 4k and 16k synthetic images;
real:    reconstruct the real files in ../shared/data/realcxr-dev (PSNR; every format must load).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from llm_cxr.vqgan import VQGAN  # noqa: E402
from llm_cxr.vqgan.metrics import psnr, ssim  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _test_images(data: str, resolution: int, limit: int | None = None):
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.vqgan.data import ImageTensorDataset, to_unit_range

    ds = load_dataset(data, split="test")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return to_unit_range(ImageTensorDataset(ds, resolution, 1, preload=True, progress=False).cache), ds


def quality(model: VQGAN, data: str, classifier: str | None) -> dict:
    x, ds = _test_images(data, model.config.resolution)
    recs, codes = [], []
    for i in range(0, len(x), 64):
        c = model.encode(x[i : i + 64])
        codes.append(c)
        recs.append(model.decode(c))
    rec = torch.cat(recs)
    codes = torch.cat(codes)
    out = {"n_test": len(x), "psnr_db": psnr(x, rec).mean().item(), "ssim": ssim(x, rec).mean().item(),
           "codebook_usage": codes.unique().numel() / model.config.n_embed,
           "codes_used": codes.unique().numel(), "codebook_size": model.config.n_embed}
    if classifier:
        from llm_cxr.classifier import (
            FindingClassifier,
            evaluate_classifier,
            load_thresholds,
            targets_from_findings,
        )

        clf = FindingClassifier.from_pretrained(classifier)
        th = load_thresholds(classifier)
        y = torch.from_numpy(targets_from_findings(ds["findings"], clf.config.labels))
        orig = evaluate_classifier(clf, x, y, th)
        recm = evaluate_classifier(clf, rec, y, th)
        out["classifier_originals"] = orig
        out["classifier_reconstructions"] = recm
        out["classifier_accuracy_drop_points"] = 100 * (orig["label_accuracy"] - recm["label_accuracy"])
        from llm_cxr.classifier import predict_proba

        po, pr = predict_proba(clf, x) >= th, predict_proba(clf, rec) >= th
        out["per_finding"] = [
            {"finding": name, "positives": int(y[:, j].sum()),
             "recall_orig": float((po[:, j] & (y[:, j] == 1)).sum() / max(1, y[:, j].sum())),
             "recall_recon": float((pr[:, j] & (y[:, j] == 1)).sum() / max(1, y[:, j].sum())),
             "agree_orig_recon": float((po[:, j] == pr[:, j]).float().mean())}
            for j, name in enumerate(clf.config.labels)]
        out["classifier_micro_f1_drop_points"] = 100 * (orig["micro_f1"] - recm["micro_f1"])
    return out


def _taming_encoder(model: VQGAN):
    from taming.modules.diffusionmodules.model import Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    c = model.config
    enc = Encoder(ch=c.ch, out_ch=c.out_ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                  attn_resolutions=c.attn_resolutions, dropout=0.0, in_channels=c.in_channels,
                  resolution=c.resolution, z_channels=c.z_channels, double_z=False).eval()
    vq = VectorQuantizer2(c.n_embed, c.embed_dim, beta=0.25, sane_index_shape=True).eval()
    sd = model.state_dict()
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    vq.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("quantize.")})
    qc = model.quant_conv

    def encode(x):
        with torch.no_grad():  # as taming's own scripts run it
            return vq(qc(enc(x)))[2][2]

    return encode


def _rate(fn, x, batch: int, repeats: int = 3) -> float:
    fn(x[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i : i + batch])
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def speed(model: VQGAN, n: int = 256, batch: int = 32) -> dict:
    r = model.config.resolution
    torch.manual_seed(0)
    x = torch.rand(n, model.config.in_channels, r, r) * 2 - 1
    ref = _taming_encoder(model)
    same = torch.equal(ref(x[:8]), model.encode(x[:8]))

    def ours_bf16(xb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode(xb)

    codes = model.encode(x)
    rows = {
        "taming_fp32": _rate(ref, x, batch),
        "ours_fp32": _rate(model.encode, x, batch),
        "ours_bf16": _rate(ours_bf16, x, batch),
    }

    def dec_bf16(c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.decode(c)

    return {"n": n, "batch": batch, "codes_identical_fp32": same, "encode_images_per_s": rows,
            "speedup_fp32": rows["ours_fp32"] / rows["taming_fp32"],
            "speedup_bf16": rows["ours_bf16"] / rows["taming_fp32"],
            "bf16_codes_agree": (ours_bf16(x[:64]) == codes[:64]).float().mean().item(),
            "decode_images_per_s": {"fp32": _rate(model.decode, codes, batch), "bf16": _rate(dec_bf16, codes, batch)}}


def scaling(run: str, sizes=(1000, 4000, 16000)) -> list[dict]:
    from llm_cxr.data.synth import SynthConfig, generate_dataset
    from llm_cxr.vqgan.encode import encode_dataset

    res = VQGAN.from_pretrained(run).config.resolution
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = Path(tmp) / f"synth{n}"
            generate_dataset(n, data, SynthConfig(size=res), seed=123, progress=False)
            t = time.perf_counter()
            encode_dataset(run, data, Path(tmp) / f"enc{n}", batch_size=64, autocast=True, progress=False)
            dt = time.perf_counter() - t
            rows.append({"images": n, "seconds": dt, "images_per_s": n / dt})
    return rows


def real(run: str) -> dict:
    from llm_cxr.vqgan.reconstruct import reconstruct_files

    folder = (REPO / ".." / "shared" / "data" / "realcxr-dev" / "images").resolve()
    if not folder.is_dir():
        return {"skipped": f"{folder} not present"}
    files = sorted(folder.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        r = reconstruct_files(run, files, tmp, progress=False)
    return {"files": len(files), "n_ok": r["n_ok"], "n_bad": r["n_bad"], "mean_psnr_db": r["mean_psnr"],
            "min_psnr_db": min(i["psnr"] for i in r["images"]) if r["images"] else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained VQ-GAN run")
    ap.add_argument("--data", help="synthetic dataset with a test split (quality)")
    ap.add_argument("--classifier", help="finding classifier folder (quality)")
    ap.add_argument("--parts", default="quality,speed,scaling,real")
    ap.add_argument("--scaling-sizes", default="1000,4000,16000")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = VQGAN.from_pretrained(args.run)
    parts = args.parts.split(",")
    data: dict = {"run": args.run, "model": model.config.to_dict()}
    run_dir = Path(args.run)
    if (run_dir / "metrics.csv").exists():
        last = (run_dir / "metrics.csv").read_text().splitlines()[-1].split(",")
        data["training"] = {"steps": int(last[0]), "seconds": float(last[-1])}
    tables = []
    if "quality" in parts and args.data:
        q = quality(model, args.data, args.classifier)
        data["quality"] = q
        row = {"test images": q["n_test"], "PSNR dB": q["psnr_db"], "SSIM": q["ssim"],
               "codebook usage": q["codebook_usage"]}
        if "classifier_originals" in q:
            row["clf acc orig"] = q["classifier_originals"]["label_accuracy"]
            row["clf acc recon"] = q["classifier_reconstructions"]["label_accuracy"]
            row["clf micro-F1 orig"] = q["classifier_originals"]["micro_f1"]
            row["clf micro-F1 recon"] = q["classifier_reconstructions"]["micro_f1"]
        tables.append(("Reconstruction quality, synthetic test split (targets: PSNR >= 30, SSIM >= 0.90, "
                       "usage >= 0.80, classifier within 2 points)", [row]))
        if "per_finding" in q:
            tables.append(("Finding classifier per finding: recall on originals and on reconstructions",
                           q["per_finding"]))
    if "speed" in parts:
        s = speed(model)
        data["speed"] = s
        e = s["encode_images_per_s"]
        tables.append((f"Encode speed, images/s (batch {s['batch']}, same weights; codes identical in fp32: "
                       f"{s['codes_identical_fp32']}; bf16 codes agree with fp32: {s['bf16_codes_agree']:.3f})",
                       [{"taming fp32": e["taming_fp32"], "ours fp32": e["ours_fp32"], "ours bf16": e["ours_bf16"],
                         "speedup fp32": s["speedup_fp32"], "speedup bf16": s["speedup_bf16"],
                         "decode fp32": s["decode_images_per_s"]["fp32"],
                         "decode bf16": s["decode_images_per_s"]["bf16"]}]))
    if "scaling" in parts:
        rows = scaling(args.run, tuple(int(v) for v in args.scaling_sizes.split(",")))
        data["scaling"] = rows
        tables.append(("`encode_dataset` time against dataset size (bf16)", rows))
    if "real" in parts:
        r = real(args.run)
        data["real"] = r
        tables.append(("Real chest X-rays (../shared/data/realcxr-dev) through the synthetic-trained model", [r]))
    write_results("vqgan", "VQ-GAN image tokenizer", data, tables)
    print(json.dumps({k: v for k, v in data.items() if k != "model"}, indent=2, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
