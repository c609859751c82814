"""Explanations measured on a dataset with ground-truth masks (the synthetic generator's): for every focal finding of
every study that the model's own report states, each method explains the sentence that states it (in the context
of the whole report, from the prompt the report was written from), and the map is scored for localisation
(pointing game, mass in mask) and faithfulness (deletion / insertion through the pipeline as it runs). Findings the
report does not state have no sentence to explain; they are counted.

The other direction (:func:`evaluate_drawings`): the codes inside a finding's mask, drawn for the study's report,
are explained by the report's words; the words that name the finding should carry the attribution.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from llm_cxr.data.schema import DEVICES, findings_from_json
from llm_cxr.explain.cases import image_to_report, report_to_image
from llm_cxr.explain.metrics import confidence_change, deletion_insertion, mask_cells, mass_in_mask, pointing_game

FOCAL = ("nodule", "mass", "consolidation", "pleural_effusion", "pneumothorax", *DEVICES)


@dataclass
class Target:
    study: str
    finding: str
    phrase: str
    cells: np.ndarray  # (grid, grid) bool: the cells the finding's mask covers
    codes: torch.Tensor  # (H*W,)
    report: str = ""  # the report whose sentence ``span`` states the finding ("": explain ``phrase`` alone)
    span: tuple[int, int] | None = None


def targets_of(row: dict, grid: int, focal=FOCAL) -> list[Target]:
    """The focal findings of a dataset row that have a mask, each with the phrase that names it."""
    from llm_cxr.lm.prompts import NAMES

    masks: dict[str, np.ndarray] = {}
    for m in row.get("masks") or []:
        if m.get("finding") in focal and m.get("mask") is not None:
            cells = mask_cells(m["mask"], grid)
            masks[m["finding"]] = masks.get(m["finding"], np.zeros_like(cells)) | cells
    out = []
    codes = torch.as_tensor(np.asarray(row["codes"])).long().reshape(-1)
    for f in findings_from_json(row.get("findings") or "[]"):
        if f.name not in masks or not masks[f.name].any() or any(t.finding == f.name for t in out):
            continue
        side = f.laterality if f.laterality in ("left", "right") else None
        name = NAMES.get(f.name, f.name.replace("_", " "))
        out.append(Target(str(row.get("id", "")), f.name, f"{side} {name}" if side else name, masks[f.name], codes))
    return out


def case_of(model, t: Target):
    """The explanation problem of a target: its sentence in its report (or its phrase alone, when it has no report),
    from the prompt the run builds for its codes."""
    stated = model.stated_findings(t.codes[None])
    stated = stated[0] if stated else None
    if t.report:
        return image_to_report(model, t.codes, t.report, t.span, stated)
    return image_to_report(model, t.codes, t.phrase, None, stated)


def reports_for(model, rows, batch_size: int = 16, progress: bool = False) -> dict[str, str]:
    """The model's reports (greedy, guided as the run was trained) for the rows with a focal finding: id -> text."""
    from tqdm.auto import tqdm

    from llm_cxr.lm.generation import Sampling

    grid = model.map.grid_size
    todo = [(str(row.get("id", "")), ts[0].codes) for row in rows if (ts := targets_of(row, grid))]
    out = {}
    for i in tqdm(range(0, len(todo), batch_size), desc="reports to explain", disable=not progress):
        chunk = todo[i:i + batch_size]
        written = model.generate_report(torch.stack([c for _, c in chunk]), Sampling(), batch_size=batch_size)
        out |= {sid: text for (sid, _), text in zip(chunk, written)}
    return out


def stated_targets(model, rows, reports: dict[str, str] | None = None, batch_size: int = 16,
                   progress: bool = False) -> tuple[list[Target], dict]:
    """The focal findings of ``rows`` (with masks) that a sentence of the model's report states as present, each
    with that sentence (the first one that states it). ``reports`` (study id -> text) gives the reports instead
    of generating them (:func:`reports_for`). Also returns counts: findings with masks, stated."""
    from llm_cxr.data.labeler import label_report
    from llm_cxr.explain.cases import sentences

    grid = model.map.grid_size
    texts = reports if reports is not None else reports_for(model, rows, batch_size, progress)
    out, total = [], 0
    for row in rows:
        ts = targets_of(row, grid)
        total += len(ts)
        report = texts.get(str(row.get("id", "")), "")
        spans = [(span, label_report(report[span[0]:span[1]]).labels) for span in sentences(report)]
        for t in ts:
            span = next((sp for sp, labels in spans if labels.get(t.finding) == 1), None)
            if span is not None:
                out.append(Target(t.study, t.finding, report[span[0]:span[1]].strip(), t.cells, t.codes, report, span))
    return out, {"findings": total, "stated": len(out)}


def evaluate_methods(model, rows, methods: dict[str, dict], faithfulness: tuple[str, ...] = ("m2ib", "random"),
                     progress: bool = False, reports: dict[str, str] | None = None, phrases: bool = False) -> dict:
    """Every method (name -> options) on every stated target of ``rows`` (:func:`stated_targets`; ``phrases``:
    explain the phrase naming each focal finding instead, whatever the model says): per method and finding,
    pointing-game accuracy and mean mass in mask; for the methods in ``faithfulness``, the mean deletion and
    insertion areas through the pipeline (and with the stated findings held fixed: the LM's route alone), and
    the confidence drop / increase with half the codes kept; seconds per explanation."""
    from tqdm.auto import tqdm

    from llm_cxr.explain import attribute

    grid = model.map.grid_size
    if phrases:
        targets = [t for row in rows for t in targets_of(row, grid)]
        counts = {"findings": len(targets), "stated": len(targets)}
    else:
        targets, counts = stated_targets(model, rows, reports, progress=progress)
    cases = [case_of(model, t) for t in targets]
    out: dict = {"targets": len(targets), **counts, "methods": {}}
    for name, options in methods.items():
        per: dict[str, dict] = {}
        faith: dict[str, list] = {}
        seconds = []
        for t, case in tqdm(list(zip(targets, cases)), desc=f"explain {name}", disable=not progress):
            t0 = time.perf_counter()
            scores = attribute(model, case, name, **options)
            seconds.append(time.perf_counter() - t0)
            m = scores.reshape(grid, grid).numpy()
            row = per.setdefault(t.finding, {"n": 0, "hits": 0, "mass": 0.0})
            row["n"] += 1
            row["hits"] += int(pointing_game(m, t.cells))
            row["mass"] += mass_in_mask(m, t.cells)
            if name in faithfulness:
                for key, value in _faithfulness(model, case, scores).items():
                    faith.setdefault(key, []).append(value)
        total = sum(r["n"] for r in per.values())
        out["methods"][name] = {
            "pointing": sum(r["hits"] for r in per.values()) / max(total, 1),
            "mass_in_mask": sum(r["mass"] for r in per.values()) / max(total, 1),
            "per_finding": {k: {"n": r["n"], "pointing": r["hits"] / r["n"], "mass_in_mask": r["mass"] / r["n"]}
                            for k, r in sorted(per.items())},
            "seconds_per_explanation": float(np.mean(seconds)) if seconds else None}
        # areas are None where the whole image gives the sentence no evidence over a blank one: left out, counted
        out["methods"][name] |= {k: float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v)
                                 else None for k, v in faith.items()}
        if faith:
            out["methods"][name]["no_evidence"] = sum(x is None for x in faith["deletion_area"])
    return out


def _faithfulness(model, case, scores: torch.Tensor) -> dict[str, float | None]:
    curves = deletion_insertion(model, case, scores)
    out = {"deletion_area": curves["deletion_area"], "insertion_area": curves["insertion_area"]}
    if case.stated is not None:  # the LM's route alone: the finding head's reading of the whole image held fixed
        fixed = deletion_insertion(model, case, scores, pipeline=False)
        out |= {"deletion_area_lm": fixed["deletion_area"], "insertion_area_lm": fixed["insertion_area"]}
    change = confidence_change(model, case, scores)
    return out | {"confidence_drop": change["drop"], "confidence_increase": change["increase"]}


def sanity(model, rows, n: int = 8, reports: dict[str, str] | None = None, progress: bool = False,
           **options) -> dict:
    """Adebayo et al.'s checks (NeurIPS 2018) of M2IB on the first ``n`` stated targets: the rank correlation of
    each map with the map after randomising the LM's blocks top down and then the finding head (mean per step),
    and, for studies whose report states two focal findings, of the two sentences' maps (another target: the map
    should move)."""
    from tqdm.auto import tqdm

    from llm_cxr.explain import attribute
    from llm_cxr.explain.metrics import cascading_randomisation, rank_correlation

    targets, _ = stated_targets(model, rows, reports, progress=progress)

    def fn(m, c):
        return attribute(m, c, "m2ib", **options)

    steps: dict[str, list[float]] = {}
    for t in tqdm(targets[:n], desc="sanity: randomised weights", disable=not progress):
        for r in cascading_randomisation(model, case_of(model, t), fn):
            steps.setdefault(r["last"], []).append(r["rank_correlation"])
    pairs = []
    by_study: dict[str, list[Target]] = {}
    for t in targets:
        by_study.setdefault(t.study, []).append(t)
    for ts in [ts for ts in by_study.values() if len(ts) > 1][:n]:
        a, b = ts[0], ts[1]
        if a.span != b.span:
            pairs.append(rank_correlation(fn(model, case_of(model, a)).numpy(),
                                          fn(model, case_of(model, b)).numpy()))
    return {"randomised": [{"randomised up to": k, "targets": len(v), "rank correlation": float(np.mean(v))}
                           for k, v in steps.items()],
            "other_target": {"pairs": len(pairs), "rank correlation": float(np.mean(pairs)) if pairs else None}}


# the words by which a report names each focal finding (the synthetic reports' and common radiology phrasing)
FINDING_WORDS: dict[str, str] = {
    "nodule": r"nodul\w*", "mass": r"mass\w*|lesion\w*", "consolidation": r"consolidat\w*|airspace|opacit\w*",
    "pleural_effusion": r"effusion\w*|pleural", "pneumothorax": r"pneumothora\w*",
    "endotracheal_tube": r"endotracheal|ett|tube", "central_line": r"central|venous|catheter\w*|line|picc",
    "chest_tube": r"chest|tube|thoracostomy|drain\w*", "pacemaker": r"pacemaker|pacer|leads?|device|generator",
}


def word_mass(words: list[str], saliency: np.ndarray, finding: str) -> dict | None:
    """Share of the (absolute) saliency on the words naming ``finding``, the share those words have of the report
    (what a method that knows nothing would give), and the best rank among them (1 = the most salient word)."""
    pattern = re.compile(rf"^(?:{FINDING_WORDS[finding]})$", re.IGNORECASE)
    hit = np.array([bool(pattern.match(re.sub(r"[^\w-]", "", w))) for w in words])
    if not hit.any() or len(words) != len(saliency):
        return None
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    order = np.argsort(-a, kind="stable")
    ranks = np.empty(len(a), dtype=np.int64)
    ranks[order] = np.arange(1, len(a) + 1)
    return {"mass": float(a[hit].sum() / max(a.sum(), 1e-12)), "chance": float(hit.mean()),
            "best_rank": int(ranks[hit].min()), "words": len(words)}


def evaluate_drawings(model, rows, methods: dict[str, dict], progress: bool = False) -> dict:
    """Report -> image: for each focal finding with a mask, every method explains the study's own codes inside the
    mask (teacher-forced: the drawing the report should give) by the report's words; per method and finding, the
    mean mass on the finding's words against its chance share, and how often one of them is the top word."""
    from tqdm.auto import tqdm

    from llm_cxr.explain import attribute, word_map
    from llm_cxr.explain.cases import plan_for, stated_for_drawing

    grid = model.map.grid_size
    targets = [(row, t) for row in rows for t in targets_of(row, grid) if t.finding in FINDING_WORDS]
    out: dict = {"targets": len(targets), "methods": {}}
    for name, options in methods.items():
        per: dict[str, dict] = {}
        cut = 0
        for row, t in tqdm(targets, desc=f"explain drawings {name}", disable=not progress):
            region = torch.as_tensor(t.cells.reshape(-1))
            stated = stated_for_drawing(model, row["report"])  # as generation prompts the drawing
            case = report_to_image(model, row["report"], t.codes, stated, region,
                                   plan_for(model, row["report"], stated))
            cut += int(case.cut)  # read as far as the run's max_length lets the model read it (counted)
            m = word_mass(case.words, word_map(case, attribute(model, case, name, **options)), t.finding)
            if m is None:
                continue
            r = per.setdefault(t.finding, {"n": 0, "mass": 0.0, "chance": 0.0, "top": 0})
            r["n"] += 1
            r["mass"] += m["mass"]
            r["chance"] += m["chance"]
            r["top"] += int(m["best_rank"] == 1)
        n = sum(r["n"] for r in per.values())
        out["methods"][name] = {
            "n": n, "cut": cut, "word_mass": sum(r["mass"] for r in per.values()) / max(n, 1),
            "chance": sum(r["chance"] for r in per.values()) / max(n, 1),
            "top_word": sum(r["top"] for r in per.values()) / max(n, 1),
            "per_finding": {k: {"n": r["n"], "word_mass": r["mass"] / r["n"], "chance": r["chance"] / r["n"],
                                "top_word": r["top"] / r["n"]} for k, r in sorted(per.items())}}
    return out


__all__ = ["FINDING_WORDS", "FOCAL", "Target", "case_of", "evaluate_drawings", "evaluate_methods", "reports_for",
           "sanity", "stated_targets", "targets_of", "word_mass"]
