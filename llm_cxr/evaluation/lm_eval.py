"""Quality of a trained llm-cxr model on a held-out split, in the three directions.

* CXR -> report: the rule-based labeler reads generated and reference findings; clinical
  micro/macro-F1 and laterality accuracy (:mod:`llm_cxr.evaluation.clinical`).
* report -> CXR: the finding classifier (trained on real images of the dataset) reads the
  generated images; micro-F1 of its findings against the findings the report asked for,
  the share of requests that produced a decodable image, and realism: the Frechet distance,
  in the classifier's pooled features, between the generated images and the VQ-GAN
  reconstructions of the same studies (with, as its floor, that of other studies' ones).
* VQA: exact-match accuracy of answers to questions made from the reference findings,
  per question kind (presence yes/no, laterality, severity, devices, list).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_cxr.configs import IMAGE_TOP_P
from llm_cxr.data.schema import FINDING_NAMES, findings_from_json
from llm_cxr.evaluation.clinical import score_reports
from llm_cxr.lm.generation import LLMCXR, Sampling
from llm_cxr.lm.prompts import (
    CHECKLIST_QUESTIONS,
    guide_items,
    make_vqa,
    parse_checklist,
    requested_findings,
    split_item,
)

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    n_reports: int = 200
    n_images: int = 200
    n_vqa_images: int = 200
    vqa_per_image: int = 4
    batch_size: int = 16
    guidance: float | None = None  # None: the run's (LLMCXR.image_guidance)
    image_temperature: float | None = None  # None: the run's (LLMCXR.image_sampling)
    image_top_p: float = IMAGE_TOP_P
    candidates: int = 1  # images drawn per report, the finding head keeps the best (LLMCXR.generate_image)
    seed: int = 0
    progress: bool = True


def _take(ds, n: int, seed: int):
    n = min(n, len(ds))
    idx = sorted(random.Random(seed).sample(range(len(ds)), n))
    return ds.select(idx)


def evaluate_reports(model: LLMCXR, ds, cfg: EvalConfig) -> dict[str, Any]:
    """Reports against the reference findings. For a checklist-guided run also what its reading stated (micro-F1,
    sides) and the writer alone: reports written from the *true* findings (what the reading would give if perfect)."""
    sub = _take(ds, cfg.n_reports, cfg.seed)
    codes = torch.as_tensor(sub.with_format("numpy")[:]["codes"]).long()
    refs = [findings_from_json(f) for f in sub["findings"]]
    t = time.monotonic()
    stated = model.stated_findings(codes, batch_size=cfg.batch_size)  # None: plain reports
    texts = _progress_map(lambda sl: model.generate_report(codes[sl], batch_size=cfg.batch_size,
                                                           findings=stated[sl] if stated else None),
                          len(sub), cfg.batch_size, "reports", cfg.progress)
    seconds = time.monotonic() - t  # reading and writing, as a user gets them
    scores = score_reports(texts, refs)
    out = {"n": len(sub), "guided": model.guided_reports, "seconds": seconds, "micro_f1": scores.micro_f1,
           "macro_f1": scores.macro_f1, "exact_match": scores.exact_match,
           "laterality_accuracy": scores.laterality_accuracy,
           "per_class": {k: {"f1": v.f1, "support": v.support} for k, v in scores.per_class.items()},
           "examples": [{"id": i, "generated": t, "reference": r} | ({"stated": f} if stated else {}) for i, t, r, f
                        in list(zip(sub["id"], texts, sub["report"], stated or [None] * len(texts)))[:8]]}
    if stated is not None:
        out["reading"] = score_reading(stated, refs)
        truth = [guide_items(r, sides=model.guide_sides) for r in refs]
        oracle = _progress_map(lambda sl: model.generate_report(codes[sl], batch_size=cfg.batch_size,
                                                                findings=truth[sl]),
                               len(sub), cfg.batch_size, "reports from the true findings", cfg.progress)
        given = score_reports(oracle, refs)
        out["writer_given_truth"] = {"micro_f1": given.micro_f1, "laterality_accuracy": given.laterality_accuracy}
    return out


def score_reading(stated: list[list[str]], refs: list[list]) -> dict[str, Any]:
    """What a guided report's prompt stated (``name`` or ``name:side`` items) against the true findings, as a
    prompt with sides would state them (:func:`guide_items`): micro-F1 over (image, finding) pairs, and the share
    of found lateralised findings whose side is right."""
    tp = fp = fn = side_ok = side_n = 0
    for items, ref in zip(stated, refs):
        said = dict(map(split_item, items))
        truth = dict(map(split_item, guide_items(ref, sides=True)))
        tp += len(said.keys() & truth.keys())
        fp += len(said.keys() - truth.keys())
        fn += len(truth.keys() - said.keys())
        for name in said.keys() & truth.keys():
            if said[name] and truth[name]:
                side_ok, side_n = side_ok + (said[name] == truth[name]), side_n + 1
    return {"micro_f1": 2 * tp / max(1, 2 * tp + fp + fn), "side_accuracy": side_ok / side_n if side_n else None,
            "n_sided": side_n}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), as FID computes it. The trace of
    sqrt(ca cb) is taken as that of sqrt(sa cb sa), sa = sqrt(ca): symmetric, so exact for singular covariances
    (fewer samples than dimensions) too."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least 2 samples on each side")
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    lam, vec = np.linalg.eigh(ca)
    sa = (vec * np.sqrt(lam.clip(min=0))) @ vec.T
    cross = np.sqrt(np.linalg.eigvalsh(sa @ cb @ sa).clip(min=0)).sum()
    d = a.mean(0) - b.mean(0)
    return float(max(0.0, d @ d + np.trace(ca) + np.trace(cb) - 2 * cross))


def _judge_input(images, r: int) -> torch.Tensor:
    from llm_cxr.vqgan.data import image_to_array, to_unit_range

    return to_unit_range(torch.from_numpy(np.stack([image_to_array(im, r, 1, "silent", name=f"generated {i}")
                                                    for i, im in enumerate(images)])))


def _embed(clf, x: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([clf.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def _reconstructions(model: LLMCXR, rows, r: int) -> torch.Tensor:
    codes = torch.as_tensor(rows.with_format("numpy")[:]["codes"]).long()
    images = []
    with torch.inference_mode():
        for i in range(0, len(codes), 32):
            images += model.vqgan.to_pil(model.vqgan.decode(codes[i:i + 32].to(model.vqgan.device)))
    return _judge_input(images, r)


def auroc(score: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); None without both classes."""
    from scipy.stats import rankdata

    pos = truth.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate_images(model: LLMCXR, ds, classifier_dir: str, cfg: EvalConfig) -> dict[str, Any]:
    from llm_cxr.classifier import FindingClassifier, load_thresholds, predict_proba

    clf = FindingClassifier.from_pretrained(classifier_dir).eval()
    thr = load_thresholds(classifier_dir)
    sub = _take(ds, cfg.n_images, cfg.seed + 1)
    reports = list(sub["report"])
    temperature = model.image_sampling().temperature if cfg.image_temperature is None else cfg.image_temperature
    sampling = Sampling(temperature=temperature, top_p=cfg.image_top_p, seed=cfg.seed)
    gens = []

    asked = [requested_findings(r) for r in reports] if cfg.candidates > 1 else None

    def run(sl):
        g = model.generate_image(reports[sl], sampling=sampling, guidance=cfg.guidance, batch_size=cfg.batch_size,
                                 candidates=cfg.candidates, findings=asked[sl] if asked else None)
        gens.append(g)
        return [None] * len(g.codes)

    _progress_map(run, len(sub), cfg.batch_size, "images", cfg.progress)
    codes = torch.cat([g.codes for g in gens])
    images = [im for g in gens for im in g.images]
    # a request is valid when it came back as a decoded image whose codes are all in the codebook
    in_range = ((codes >= 0) & (codes < model.map.n_codes)).flatten(1).all(1)
    valid = min(len(images), int(in_range.sum())) / max(1, len(sub))
    r = clf.config.resolution  # the classifier's own input size, as it was trained
    x = _judge_input(images, r)
    proba = predict_proba(clf, x).numpy()
    pred = (proba >= np.asarray(thr)).astype(np.int64)
    # realism: against the reconstructions of the same studies' true codes (what the LM was taught to draw); the
    # floor is the distance of as many other studies' reconstructions from them (same n, so the same bias)
    ref = _embed(clf, _reconstructions(model, sub, r))
    frechet = frechet_distance(_embed(clf, x), ref) if len(sub) >= 2 else None
    chosen = set(sub["id"])
    rest = [i for i, sid in enumerate(ds["id"]) if sid not in chosen]
    floor = None
    if frechet is not None and len(rest) >= len(sub):
        others = ds.select(sorted(random.Random(cfg.seed + 3).sample(rest, len(sub))))
        floor = frechet_distance(_embed(clf, _reconstructions(model, others, r)), ref)
    names = list(clf.config.labels)
    want = np.zeros_like(pred)
    for i, fj in enumerate(sub["findings"]):
        for f in findings_from_json(fj):
            if f.name in names:
                want[i, names.index(f.name)] = 1
    tp = float((pred * want).sum())
    fp = float((pred * (1 - want)).sum())
    fn = float(((1 - pred) * want).sum())
    per = {}
    for j, n in enumerate(names):
        t, p_, f_ = (pred[:, j] * want[:, j]).sum(), (pred[:, j] * (1 - want[:, j])).sum(), \
            ((1 - pred[:, j]) * want[:, j]).sum()
        per[n] = {"f1": float(2 * t / max(1, 2 * t + p_ + f_)), "support": int(want[:, j].sum()),
                  "auroc": auroc(proba[:, j], want[:, j])}
    return {"n": len(sub), "guidance": model.guidance_scale(cfg.guidance),
            "micro_f1": 2 * tp / max(1.0, 2 * tp + fp + fn), "valid_image_rate": valid,
            "frechet": frechet, "frechet_floor": floor, "exact_match": float((pred == want).all(1).mean()),
            "per_class": per, "images": images[:16], "reports": reports[:16], "ids": list(sub["id"][:16])}


def evaluate_vqa(model: LLMCXR, ds, cfg: EvalConfig) -> dict[str, Any]:
    sub = _take(ds, cfg.n_vqa_images, cfg.seed + 2)
    images = torch.as_tensor(sub.with_format("numpy")[:]["codes"]).long()  # (N, H*W)
    qs, image_of, kinds, answers, findings = [], [], [], [], []
    for i, (sid, fj) in enumerate(zip(sub["id"], sub["findings"])):
        rng = random.Random(f"{cfg.seed}:{sid}:eval")
        for qa in make_vqa(findings_from_json(fj), rng, cfg.vqa_per_image, FINDING_NAMES):
            qs.append(qa.question)
            image_of.append(i)
            kinds.append(qa.kind)
            answers.append(qa.answer)
            findings.append(qa.finding)
    codes_t = images[image_of]
    # a guided run's reading, once per image (each is asked several questions); None: plain questions
    read = model.stated_findings(images, batch_size=cfg.batch_size, task="vqa")
    per_question = [read[i] for i in image_of] if read is not None else None

    def ask(stated: list | None, desc: str) -> list[str]:
        return _progress_map(lambda sl: model.answer(codes_t[sl], qs[sl], batch_size=cfg.batch_size, guided=False,
                                                     findings=stated[sl] if stated is not None else None),
                             len(qs), cfg.batch_size, desc, cfg.progress)

    def core_accuracy(got: list[str]) -> float:
        core = [g.strip().lower() == a.lower() for g, a, k in zip(got, answers, kinds)
                if k in ("presence", "laterality")]
        return sum(core) / max(1, len(core))

    got = ask(per_question, "questions")
    ok = [g.strip().lower() == a.lower() for g, a in zip(got, answers)]
    by_kind: dict[str, list[bool]] = {}
    for k, o in zip(kinds, ok):
        by_kind.setdefault(k, []).append(o)
    presence: dict[str, list[bool]] = {}
    for k, f, o in zip(kinds, findings, ok):
        if k == "presence" and f:
            presence.setdefault(f, []).append(o)
    checklist = _evaluate_checklist(model, sub, images, cfg)
    # a guided run answers with its reading in the prompt; the model's own reading is scored beside it
    alone = core_accuracy(ask(None, "questions, unguided")) if read is not None else None
    return {"n_questions": len(qs), "guided": read is not None, "accuracy_yes_no_laterality": core_accuracy(got),
            "accuracy_yes_no_laterality_unguided": alone, "checklist": checklist,
            "accuracy_all": sum(ok) / max(1, len(ok)),
            "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in by_kind.items()},
            "presence_by_finding": {f: {"accuracy": sum(v) / len(v), "n": len(v)} for f, v in sorted(presence.items())},
            "examples": [{"id": sub["id"][i], "q": q, "answer": a, "got": g}
                         for i, q, a, g in list(zip(image_of, qs, answers, got))[:12]]}


def _evaluate_checklist(model: LLMCXR, sub, codes_t: torch.Tensor, cfg: EvalConfig) -> dict[str, Any]:
    """Every finding answered at once (the ``checklist`` question) against the ground truth: micro-F1 over
    (image, finding) pairs; an item the answer leaves out counts as "no", a missing answer as all "no"."""
    q = CHECKLIST_QUESTIONS[0]
    got = _progress_map(lambda sl: model.answer(codes_t[sl], q, max_new_tokens=96, batch_size=cfg.batch_size,
                                                guided=False),
                        len(codes_t), cfg.batch_size, "checklists", cfg.progress)
    tp = fp = fn = agree = total = complete = 0
    for text, fj in zip(got, sub["findings"]):
        said = parse_checklist(text)
        complete += len(said) == len(FINDING_NAMES)
        present = {f.name for f in findings_from_json(fj)}
        for name in FINDING_NAMES:
            p, w = said.get(name, False), name in present
            tp, fp, fn = tp + (p and w), fp + (p and not w), fn + (w and not p)
            agree, total = agree + (p == w), total + 1
    return {"n_images": len(got), "micro_f1": 2 * tp / max(1, 2 * tp + fp + fn), "accuracy": agree / max(1, total),
            "complete_rate": complete / max(1, len(got)), "example": got[0] if got else None}


def _progress_map(fn, n: int, batch: int, desc: str, progress: bool) -> list:
    from tqdm.auto import tqdm

    out: list = []
    with tqdm(total=n, desc=desc, disable=not progress) as bar:
        for i in range(0, n, batch):
            sl = slice(i, min(n, i + batch))
            out += fn(sl)
            bar.update(sl.stop - sl.start)
    return out


def evaluate_all(model: LLMCXR, data: str, split: str = "test", classifier: str | None = None, n: int = 200,
                 guidance: float | None = None, batch_size: int = 16, seed: int = 0, progress: bool = True,
                 out=None) -> dict[str, Any]:
    """Every direction on ``split`` of ``data``; a ``summary`` of headline numbers plus the details.

    With ``out`` (a .json path) the results are written there and sample images beside it.
    """
    import json
    from pathlib import Path

    from llm_cxr.data.dataset import load_dataset

    ds = load_dataset(data, split=split)
    if "codes" not in ds.column_names:
        from llm_cxr.errors import DatasetError

        raise DatasetError(f"{data} has no codes column: encode it with the model's VQ-GAN first")
    cfg = EvalConfig(n_reports=n, n_images=n, n_vqa_images=n, batch_size=batch_size, guidance=guidance, seed=seed,
                     progress=progress)
    res: dict[str, Any] = {"reports": evaluate_reports(model, ds, cfg)}
    res["vqa"] = evaluate_vqa(model, ds, cfg)
    t_img = 0.0
    if classifier and model.vqgan is not None:
        t = time.monotonic()
        res["images"] = evaluate_images(model, ds, classifier, cfg)
        t_img = time.monotonic() - t
    summary = {"report_guided": res["reports"]["guided"], "report_clinical_micro_f1": res["reports"]["micro_f1"],
               "report_laterality_accuracy": res["reports"]["laterality_accuracy"],
               "vqa_guided": res["vqa"]["guided"], "vqa_accuracy": res["vqa"]["accuracy_yes_no_laterality"],
               "vqa_accuracy_unguided": res["vqa"]["accuracy_yes_no_laterality_unguided"],
               "vqa_accuracy_all_kinds": res["vqa"]["accuracy_all"],
               "checklist_micro_f1": res["vqa"]["checklist"]["micro_f1"],
               "report_reading_micro_f1": res["reports"].get("reading", {}).get("micro_f1"),
               "report_reading_side_accuracy": res["reports"].get("reading", {}).get("side_accuracy"),
               "report_writer_micro_f1_given_truth": res["reports"].get("writer_given_truth", {}).get("micro_f1"),
               "reports_per_minute": res["reports"]["n"] / max(res["reports"]["seconds"], 1e-9) * 60}
    if "images" in res:
        summary.update({"image_finding_micro_f1": res["images"]["micro_f1"],
                        "valid_image_rate": res["images"]["valid_image_rate"],
                        "image_frechet": res["images"]["frechet"],
                        "image_frechet_floor": res["images"]["frechet_floor"],
                        "images_per_minute": res["images"]["n"] / max(t_img, 1e-9) * 60})
    res["summary"] = summary
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        samples = res.get("images", {}).pop("images", [])
        for i, im in enumerate(samples):
            im.save(out.parent / f"{out.stem}_image_{i:02d}.png")
        _per_class_pngs(res, out)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def _per_class_pngs(res: dict[str, Any], out: Path) -> None:
    """Per-class bars beside the results JSON: report F1, and image F1 and AUROC (the judge's scores)."""
    from llm_cxr.evaluation.plots import bars_png

    figures = {}
    if "reports" in res:
        per = res["reports"]["per_class"]
        figures["reports"] = bars_png({"F1": {k: v["f1"] for k, v in per.items()}}, list(per),
                                      "Reports: findings the labeler reads vs. the truth", "F1",
                                      {k: v["support"] for k, v in per.items()})
    if "images" in res:
        per = res["images"]["per_class"]
        figures["images"] = bars_png({"F1": {k: v["f1"] for k, v in per.items()},
                                      "AUROC": {k: v.get("auroc") or 0.0 for k, v in per.items()}}, list(per),
                                     "Images: findings the judge classifier finds vs. those asked for", "score",
                                     {k: v["support"] for k, v in per.items()})
    for name, png in figures.items():
        if png is not None:
            (out.parent / f"{out.stem}_{name}_per_class.png").write_bytes(png)

