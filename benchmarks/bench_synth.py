"""Synthetic chest X-ray generator: speed on one core, and what it generates.

Measures ``generate_study`` (image + masks + report) in images/s at 64-512 px on one core
(all math libraries limited to one thread), end-to-end ``generate_dataset`` throughput at
128 px (PNG encoding and Arrow writing included), the finding mix of the default config,
and ground-truth checks on the rendered masks (every present finding has a mask, on the
right side, CTR from the masks above/below 0.5). Target: >= 200 images/s at 128 px.

    python benchmarks/bench_synth.py [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import write_results  # noqa: E402

from llm_cxr.data.schema import DEVICES, PATHOLOGIES  # noqa: E402
from llm_cxr.data.synth import SynthConfig, generate_dataset, generate_study, sample_findings  # noqa: E402


def study_speed(size: int, n: int, repeats: int = 3) -> dict:
    cfg = SynthConfig(size=size)
    generate_study(np.random.default_rng(0), cfg)  # builds the cached grids and noise bank
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            generate_study(np.random.default_rng([r, i]), cfg)
        rates.append(n / (time.perf_counter() - t0))
    best = max(rates)
    return {"size_px": size, "images": n * repeats, "images_per_s_best": best,
            "images_per_s_median": float(np.median(rates)), "ms_per_image": 1000.0 / best}


def dataset_speed(n: int, workers: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        t0 = time.perf_counter()
        summary = generate_dataset(n, tmp / "ds", SynthConfig(size=128), seed=0, workers=workers, progress=False)
        dt = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (tmp / "ds").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"size_px": 128, "images": summary.n_rows, "workers": workers, "seconds": dt,
            "images_per_s": summary.n_rows / dt, "kb_per_image_on_disk": disk / 1024 / summary.n_rows}


def finding_mix(n: int) -> tuple[dict, list[dict]]:
    cfg = SynthConfig()
    counts: Counter = Counter()
    n_path, any_device = [], 0
    for i in range(n):
        fs = sample_findings(np.random.default_rng([0, 0, i]), cfg)
        names = [f.name for f in fs]
        counts.update(names)
        n_path.append(sum(nm in PATHOLOGIES for nm in names))
        any_device += any(nm in DEVICES for nm in names)
    summary = {"studies": n, "no_pathology": float(np.mean(np.array(n_path) == 0)),
               "mean_pathologies_if_any": float(np.mean([k for k in n_path if k])), "any_device": any_device / n}
    rows = [{"finding": nm, "prevalence": counts[nm] / n} for nm in PATHOLOGIES + DEVICES]
    return summary, rows


def mask_checks(n: int, size: int = 128) -> dict:
    cfg = SynthConfig(size=size, normal_fraction=0.0, device_rates={d: 0.3 for d in DEVICES})
    empty = wrong_side = lateral = inside = total = 0
    ctr = {True: [], False: []}
    min_nodule_px = np.inf

    def width(m):
        cols = np.where(m.any(0))[0]
        return cols.max() - cols.min() + 1

    for i in range(n):
        st = generate_study(np.random.default_rng([42, i]), cfg)
        has_cm = any(f.name == "cardiomegaly" for f in st.findings)
        ctr[has_cm].append(width(st.anatomy["heart"]) / width(st.anatomy["lungs"]))
        for f in st.findings:
            m = st.masks[f.name]
            total += 1
            if not m.any():
                empty += 1
                continue
            inside += (m & st.anatomy["body"]).sum() >= 0.9 * m.sum()
            if f.name == "nodule":
                min_nodule_px = min(min_nodule_px, 2 * np.sqrt(m.sum() / np.pi))
            if f.laterality in ("left", "right") and f.name not in ("pacemaker", "central_line"):
                lateral += 1
                wrong_side += (m[:, size // 2:].sum() / m.sum() > 0.5) != (f.laterality == "left")
    return {"studies": n, "size_px": size, "findings": total, "empty_masks": empty,
            "masks_90pct_inside_body": inside / max(1, total - empty), "lateral_findings": lateral,
            "mask_on_wrong_side": wrong_side, "ctr_cardiomegaly_min": float(min(ctr[True])),
            "ctr_normal_max": float(max(ctr[False])), "smallest_nodule_diameter_px": float(min_nodule_px)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    args = ap.parse_args()
    q = 0.2 if args.quick else 1.0
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    per_size = {64: 600, 128: 400, 256: 120, 512: 30}
    speed = [study_speed(s, max(5, int(k * q))) for s, k in per_size.items()]
    e2e = [dataset_speed(max(20, int(300 * q)), w) for w in (1, 2)]
    mix, prevalence = finding_mix(max(500, int(5000 * q)))
    checks = mask_checks(max(50, int(300 * q)))
    target = next(r for r in speed if r["size_px"] == 128)["images_per_s_best"]
    notes = (f"generate_study at 128 px: {target:.0f} images/s on one core (target >= 200). "
             f"End-to-end includes PNG encoding of image and masks and the Arrow write; workers=2 "
             f"uses a spawn pool, so on a small dataset its start-up cost shows. Load average "
             f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after the run (other jobs "
             f"on the machine slow the numbers down).")
    write_results(
        "synth", "Synthetic chest X-ray generator",
        {"generate_study": speed, "generate_dataset": e2e, "finding_mix": mix, "prevalence": prevalence,
         "mask_checks": checks, "target_images_per_s_128": 200, "meets_target": target >= 200,
         "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        [("generate_study, one core", speed), ("generate_dataset end to end (128 px)", e2e),
         ("Default finding mix", [mix]), ("Prevalence per finding (default config)", prevalence),
         ("Ground-truth checks on rendered masks", [checks])],
        notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
