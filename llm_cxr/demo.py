"""The end-to-end demo on the embedded synthetic data (the README's first command).

Each step is a cached :class:`~llm_cxr.pipeline.Stages` stage under ``OUT/cache``; a second
run reuses them and only rewrites the page. Results go to ``OUT/summary.json`` (for
machines) and ``OUT/index.html`` (for people).

Steps: synthesise a dataset with ground truth; read every report back with the rule-based
labeler and score it against the planted findings; train the ``tiny`` VQ-GAN, measure its
reconstructions and encode the dataset; train the finding classifier that judges generated
images; make the embedded base LM (report tokenizer + tiny GPT-NeoX on report text); fine-tune
it with LoRA on CXR -> report, report -> CXR and VQA; generate and evaluate on the test split;
explain a few generated reports with M2IB and measure where its maps point; write the page.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_cxr import __version__
from llm_cxr.demo_page import explanations_section, metrics_rows, outputs_sections
from llm_cxr.pipeline import Stages, code_hash
from llm_cxr.report_html import Page, dataset_cards, dump_json

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("OUT")
    n: int = 10000
    size: int = 128
    seed: int = 0
    fresh: bool = False
    progress: bool = True
    vqgan_steps: int = 800
    lm_pretrain_steps: int = 600
    lm_steps: int = 3000
    classifier_epochs: int = 2
    n_eval: int = 200  # test studies per task: at 100 one draw's micro-F1 moves by ~0.03 between samples
    n_explain: int = 4  # test studies whose generated reports the page explains, sentence by sentence
    n_localise: int = 40  # test studies over which M2IB's pointing game is measured against random maps

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.n < 20:
            raise ValueError(f"demo needs at least 20 images to make train/val/test splits, got n={self.n}")
        if not 64 <= self.size <= 512:
            raise ValueError(f"demo image size must be 64-512 px, got {self.size}")


def _stage_synth(stages: Stages, cfg: DemoConfig):
    from llm_cxr.data import synth, synth_findings, synth_render, synth_report
    from llm_cxr.data.synth import SynthConfig, generate_dataset

    fp = {"n": cfg.n, "size": cfg.size, "seed": cfg.seed,
          "code": code_hash(synth, synth_report, synth_render, synth_findings)}

    def build(tmp: Path) -> dict[str, Any]:
        # the same studies whatever the number of workers
        summary = generate_dataset(cfg.n, tmp / "dataset", SynthConfig(size=cfg.size), seed=cfg.seed,
                                   workers=min(2, os.cpu_count() or 1), progress=cfg.progress)
        return {"n_rows": summary.n_rows, "splits": summary.splits}

    return stages.run("synth", fp, build)


def _stage_labeler(stages: Stages, cfg: DemoConfig, data_dir: Path):
    """Score the labeler on the synthetic reports: it must recover the planted findings."""
    from llm_cxr.data import labeler
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.data.schema import findings_from_json
    from llm_cxr.evaluation import clinical

    fp = {"data": str(data_dir), "synth": stages.key("synth"), "code": code_hash(labeler, clinical)}

    def build(tmp: Path) -> dict[str, Any]:
        ds = load_dataset(data_dir).select_columns(["report", "findings"])
        t0 = time.perf_counter()
        scores = clinical.score_reports(ds["report"], [findings_from_json(s) for s in ds["findings"]])
        dt = time.perf_counter() - t0
        dump_json(scores.to_dict(), tmp / "scores.json")
        return {"exact_match": scores.exact_match, "micro_f1": scores.micro_f1,
                "laterality_accuracy": scores.laterality_accuracy, "reports_per_s": len(ds) / max(dt, 1e-9),
                "per_class": scores.table()}

    return stages.run("labeler", fp, build)


def _stage_vqgan(stages: Stages, cfg: DemoConfig, data_dir: Path):
    """Train the tiny VQ-GAN on the demo data and measure its test-split reconstructions."""
    import torch

    from llm_cxr import vqgan
    from llm_cxr.accel import bf16_is_fast
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.vqgan import VQGAN
    from llm_cxr.vqgan.data import ImageTensorDataset, to_unit_range
    from llm_cxr.vqgan.metrics import psnr, ssim
    from llm_cxr.vqgan.train import load_train_config, train_vqgan

    fp = {"synth": stages.key("synth"), "steps": cfg.vqgan_steps, "seed": cfg.seed,
          "code": code_hash(vqgan.model, vqgan.modules, vqgan.quantize, vqgan.train, vqgan.losses)}

    def build(tmp: Path) -> dict[str, Any]:
        run = train_vqgan(load_train_config("tiny", data=str(data_dir), out=str(tmp / "run"), steps=cfg.vqgan_steps,
                                            seed=cfg.seed, progress=cfg.progress, sample_every=10**9))
        model = VQGAN.from_pretrained(run)
        test = load_dataset(data_dir, split="test")
        x = to_unit_range(ImageTensorDataset(test, model.config.resolution, 1, progress=False, preload=True).cache)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast("cpu")):
            codes = model.encode(x)
        rec = model.decode(codes)
        for i, (a, b) in enumerate(zip(VQGAN.to_pil(x[:8]), VQGAN.to_pil(rec[:8]))):
            a.save(tmp / f"orig_{i}.png")
            b.save(tmp / f"recon_{i}.png")
        return {"psnr": psnr(x, rec).mean().item(), "ssim": ssim(x, rec).mean().item(),
                "codebook_usage": codes.unique().numel() / model.config.n_embed, "n_test": len(x),
                "resolution": model.config.resolution, "grid": model.config.grid_size}

    return stages.run("vqgan", fp, build)


def _stage_encode(stages: Stages, cfg: DemoConfig, data_dir: Path):
    from llm_cxr.vqgan import encode as enc_mod
    from llm_cxr.vqgan.encode import encode_dataset

    vq = stages.results["vqgan"]
    fp = {"vqgan": stages.key("vqgan"), "synth": stages.key("synth"), "code": code_hash(enc_mod)}

    def build(tmp: Path) -> dict[str, Any]:
        info = encode_dataset(vq.path / "run", data_dir, tmp / "dataset", progress=cfg.progress)
        return {"n": info["n"], "grid": info["grid_size"], "n_embed": info["n_embed"]}

    return stages.run("encode", fp, build)


def _stage_classifier(stages: Stages, cfg: DemoConfig, data_dir: Path):
    """The finding classifier that judges generated images (trained on real images of the demo data)."""
    from llm_cxr import classifier
    from llm_cxr.classifier import ClassifierTrainConfig, train_classifier

    res = stages.results["vqgan"].info["resolution"]
    fp = {"synth": stages.key("synth"), "res": res, "epochs": cfg.classifier_epochs, "seed": cfg.seed,
          "code": code_hash(classifier)}

    def build(tmp: Path) -> dict[str, Any]:
        m = train_classifier(ClassifierTrainConfig(data=str(data_dir), out=str(tmp / "run"), resolution=res,
                                                   epochs=cfg.classifier_epochs, seed=cfg.seed,
                                                   progress=cfg.progress))
        return {"test_micro_f1": m["micro_f1"], "test_exact_match": m["exact_match"]}

    return stages.run("classifier", fp, build)


def _stage_lm(stages: Stages, cfg: DemoConfig, codes_dir: Path):
    """Base LM on report text, then one LoRA stage with all three tasks (the `tiny` preset)."""
    from llm_cxr import lm, train
    from llm_cxr.train.base import pretrain_base
    from llm_cxr.train.config import LoopConfig, PretrainConfig, load_lm_config, preset_path
    from llm_cxr.train.stage import train_lm

    # the recipe is the shipped `tiny` preset (llm_cxr/train/presets/tiny_stage1.yaml), the same file
    # `llm-cxr train --preset tiny --stage 1` reads; the demo sets only its paths, seed and length
    fp = {"encode": stages.key("encode"), "pre": cfg.lm_pretrain_steps, "steps": cfg.lm_steps,
          "seed": cfg.seed, "code": code_hash(lm, train)}

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        base = pretrain_base(PretrainConfig(data=str(codes_dir), out=str(tmp / "base"), preset="tiny",
                                            loop=LoopConfig(steps=cfg.lm_pretrain_steps, batch_size=32, lr=2e-3,
                                                            warmup_steps=20, eval_every=0, seed=cfg.seed,
                                                            progress=cfg.progress)))
        t1 = time.perf_counter()
        run = train_lm(load_lm_config(preset_path("tiny", 1), data=str(codes_dir), out=str(tmp / "run"),
                                      base=str(base), steps=cfg.lm_steps, seed=cfg.seed, progress=cfg.progress,
                                      eval_every=cfg.lm_steps,
                                      # two tokenising processes make the same examples in about half the time
                                      num_proc=min(2, os.cpu_count() or 1)))
        t2 = time.perf_counter()
        shutil.copy(run / "metrics.csv", tmp / "metrics.csv")
        trainable = __import__("json").loads((run / "trainable.json").read_text())
        return {"pretrain_seconds": t1 - t0, "train_seconds": t2 - t1, **trainable}

    return stages.run("lm", fp, build)


def _stage_generate(stages: Stages, cfg: DemoConfig, codes_dir: Path):
    """Reports for test images, images for test reports, answers; scored against the ground truth."""
    from llm_cxr.evaluation import baselines, lm_eval
    from llm_cxr.evaluation.lm_eval import evaluate_all
    from llm_cxr.lm.generation import LLMCXR

    fp = {"lm": stages.key("lm"), "clf": stages.key("classifier"), "n": cfg.n_eval,
          "code": code_hash(lm_eval, baselines)}

    def build(tmp: Path) -> dict[str, Any]:
        model = LLMCXR.from_pretrained(stages.results["lm"].path / "run",
                                       vqgan=stages.results["vqgan"].path / "run")
        res = evaluate_all(model, str(codes_dir), "test", str(stages.results["classifier"].path / "run"),
                           n=cfg.n_eval, seed=cfg.seed, progress=cfg.progress, out=tmp / "eval.json")
        return {**res["summary"], "report_floor_nearest_report": _retrieval_floor(codes_dir)}

    return stages.run("generate", fp, build)


def _stage_explain(stages: Stages, cfg: DemoConfig, codes_dir: Path):
    """M2IB maps for each sentence of a few generated test reports (the page shows them over the image), and its
    pointing game on the test split's focal findings beside random maps (llm_cxr.explain.evaluate)."""
    import json
    from importlib import import_module

    import torch

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.explain import explain
    from llm_cxr.lm.generation import LLMCXR

    explain_eval = import_module("llm_cxr.explain.evaluate")
    fp = {"generate": stages.key("generate"), "n": cfg.n_explain, "loc": cfg.n_localise,
          "code": code_hash(*(import_module(f"llm_cxr.explain.{m}")
                              for m in ("m2ib", "routes", "cases", "evaluate", "metrics")),
                            import_module("llm_cxr.explain"))}

    def build(tmp: Path) -> dict[str, Any]:
        model = LLMCXR.from_pretrained(stages.results["lm"].path / "run", vqgan=stages.results["vqgan"].path / "run")
        test = load_dataset(codes_dir, split="test")
        rows = {sid: i for i, sid in enumerate(test["id"])}
        examples = json.loads((stages.results["generate"].path / "eval.json").read_text())["reports"]["examples"]
        shown, sentences, t0 = [], 0, time.perf_counter()
        for ex in [e for e in examples if e["id"] in rows][:cfg.n_explain]:
            codes = torch.as_tensor(test[rows[ex["id"]]]["codes"]).long().reshape(-1)
            why = explain(model, image=codes, written=ex["generated"], method="m2ib")
            why.save(tmp / ex["id"])
            shown.append(ex["id"])
            sentences += len(why.targets)
        per_sentence = (time.perf_counter() - t0) / max(sentences, 1)
        loc = explain_eval.evaluate_methods(model, list(test.select(range(min(cfg.n_localise, len(test))))),
                                            {"m2ib": {}, "random": {}}, faithfulness=(), progress=cfg.progress)
        return {"studies": shown, "seconds_per_sentence": per_sentence, "targets": loc["targets"],
                "pointing_m2ib": loc["methods"]["m2ib"]["pointing"],
                "pointing_random": loc["methods"]["random"]["pointing"],
                "mass_in_mask_m2ib": loc["methods"]["m2ib"]["mass_in_mask"],
                "mass_in_mask_random": loc["methods"]["random"]["mass_in_mask"]}

    return stages.run("explain", fp, build)


def _retrieval_floor(codes_dir: Path) -> float:
    """Report micro-F1 of the nearest-report retrieval baseline on the test split: what copying the report of the
    most similar training image achieves. A model below it has learnt little from the image."""
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.data.schema import findings_from_json
    from llm_cxr.evaluation.baselines import nearest_report_dataset
    from llm_cxr.evaluation.clinical import score_reports

    rows = nearest_report_dataset(codes_dir, "test")
    test = load_dataset(codes_dir, split="test")
    truth = dict(zip(test["id"], test["findings"]))
    return score_reports([r["report"] for r in rows], [findings_from_json(truth[r["id"]]) for r in rows]).micro_f1


def _prevalence(ds) -> list[dict[str, Any]]:
    from llm_cxr.data.schema import findings_from_json

    counts: dict[str, Counter] = {}
    totals = Counter(ds["split"])
    for split, text in zip(ds["split"], ds["findings"]):
        for name in {f.name for f in findings_from_json(text)}:
            counts.setdefault(name, Counter())[split] += 1
    rows = []
    for name in sorted(counts):
        rows.append({"finding": name, **{s: counts[name][s] for s in ("train", "val", "test")},
                     "share": sum(counts[name].values()) / len(ds)})
    rows.append({"finding": "(images)", **{s: totals[s] for s in ("train", "val", "test")}, "share": 1.0})
    return rows


def _write_page(cfg: DemoConfig, stages: Stages, summary: dict[str, Any]) -> Path:
    from llm_cxr.data.dataset import load_dataset

    ds = load_dataset(stages.results["synth"].path / "dataset")
    page = Page("llm-cxr demo", f"llm-cxr {__version__} · {cfg.n} synthetic chest X-rays at {cfg.size} px · "
                                f"seed {cfg.seed} · {summary['seconds_total']:.1f} s")
    m = summary["metrics"]
    page.heading("Results on the test split")
    page.table(metrics_rows(m, {"report_clinical_micro_f1": m.get("report_floor_nearest_report"),
                                "image_frechet": m.get("image_frechet_floor")}),
               caption="floor: the nearest-report retrieval baseline (reports); other real studies (realism)")
    from llm_cxr.vqgan import VQGAN

    codes = load_dataset(summary["paths"]["data"], split="test")
    outputs_sections(page, stages.results["generate"].path, codes, VQGAN.from_pretrained(summary["paths"]["vqgan"]),
                     cfg.out / "assets", "assets")
    explanations_section(page, stages.results["explain"], codes, cfg.out / "assets", "assets")
    page.heading("Synthetic data: findings per split")
    page.table(_prevalence(ds.select_columns(["split", "findings"])))
    page.heading("Report labeler on the synthetic reports (planted findings as reference)")
    page.table(stages.results["labeler"].info["per_class"])
    vq = stages.results["vqgan"]
    page.heading(f"VQ-GAN (tiny: {vq.info['resolution']} px -> {vq.info['grid']}x{vq.info['grid']} codes): "
                 "test images (top) and their reconstructions (bottom)")
    (cfg.out / "assets").mkdir(parents=True, exist_ok=True)
    row = {"orig": [], "recon": []}
    for kind in row:
        for f in sorted(vq.path.glob(f"{kind}_*.png")):
            shutil.copy(f, cfg.out / "assets" / f"vq_{f.name}")
            row[kind].append(f'<img src="assets/vq_{f.name}" width="96" style="image-rendering:pixelated">')
    page.raw("<div>" + "".join(row["orig"]) + "</div><div>" + "".join(row["recon"]) + "</div>")
    page.heading("Test images with their ground truth (masks tinted by finding)")
    test = ds.filter(lambda s: s == "test", input_columns="split")
    page.cards(dataset_cards(test, cfg.out / "assets", "assets", n=16))
    page.heading("What each stage cost")
    page.table([{"stage": k, "seconds to build": v["built_seconds"], "this run": "cached" if v["cached"] else
                 f"{v['seconds']:.1f} s"} for k, v in stages.timings().items()],
               caption=f"built in {summary['seconds_built']:.0f} s in all")
    return page.write(cfg.out)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every demo stage (reusing cached ones) and write summary.json and index.html."""
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(cfg.out / "cache", fresh=cfg.fresh)
    synth_stage = _stage_synth(stages, cfg)
    lab = _stage_labeler(stages, cfg, synth_stage.path / "dataset")
    vq = _stage_vqgan(stages, cfg, synth_stage.path / "dataset")
    enc = _stage_encode(stages, cfg, synth_stage.path / "dataset")
    clf = _stage_classifier(stages, cfg, synth_stage.path / "dataset")
    lm = _stage_lm(stages, cfg, enc.path / "dataset")
    gen = _stage_generate(stages, cfg, enc.path / "dataset")
    why = _stage_explain(stages, cfg, enc.path / "dataset")
    metrics = {
        "n_images": synth_stage.info["n_rows"],
        "labeler_synthetic_exact_match": lab.info["exact_match"],
        "labeler_synthetic_micro_f1": lab.info["micro_f1"],
        "labeler_synthetic_laterality_accuracy": lab.info["laterality_accuracy"],
        "vqgan_psnr": vq.info["psnr"],
        "vqgan_ssim": vq.info["ssim"],
        "vqgan_codebook_usage": vq.info["codebook_usage"],
        "classifier_test_micro_f1": clf.info["test_micro_f1"],
        "lm_trainable_share": lm.info["share"],
        "report_clinical_micro_f1": gen.info["report_clinical_micro_f1"],
        "report_laterality_accuracy": gen.info["report_laterality_accuracy"],
        "image_finding_micro_f1": gen.info["image_finding_micro_f1"],
        "valid_image_rate": gen.info["valid_image_rate"],
        "image_frechet": gen.info.get("image_frechet"),
        "image_frechet_floor": gen.info.get("image_frechet_floor"),
        "report_floor_nearest_report": gen.info.get("report_floor_nearest_report"),
        "vqa_accuracy": gen.info["vqa_accuracy"],
        "reports_per_minute": gen.info["reports_per_minute"],
        "images_per_minute": gen.info["images_per_minute"],
        "explain_pointing_m2ib": why.info["pointing_m2ib"],
        "explain_pointing_random": why.info["pointing_random"],
        "explain_seconds_per_sentence": why.info["seconds_per_sentence"],
    }
    summary: dict[str, Any] = {
        "version": __version__,
        "config": {"n": cfg.n, "size": cfg.size, "seed": cfg.seed},
        "splits": synth_stage.info["splits"],
        "metrics": metrics,
        "stages": stages.timings(),
        "seconds_built": round(sum(r.built_seconds for r in stages.results.values()), 2),
        "paths": {"model": str(lm.path / "run"), "vqgan": str(vq.path / "run"), "data": str(enc.path / "dataset"),
                  "classifier": str(clf.path / "run")},
    }
    summary["seconds_total"] = time.perf_counter() - t0
    _write_page(cfg, stages, summary)
    summary["seconds_total"] = round(time.perf_counter() - t0, 2)
    dump_json(summary, cfg.out / "summary.json")
    log.info("demo done in %.1f s: %s", summary["seconds_total"], cfg.out / "index.html")
    return summary
