"""Explanations measured on a dataset with ground-truth masks (the synthetic generator's): for every focal finding of
every study, each method explains the phrase that names it (with its side, as MS-CXR grounds phrases in boxes), and
the map is scored for localisation (pointing game, mass in mask) and faithfulness (deletion / insertion).

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


def evaluate_methods(model, rows, methods: dict[str, dict], faithfulness: tuple[str, ...] = ("m2ib", "random"),
                     progress: bool = False) -> dict:
    """Every method (name -> options) on every target of ``rows``: per method and finding, pointing-game accuracy
    and mean mass in mask; for the methods in ``faithfulness``, mean deletion and insertion areas and the confidence
    drop / increase with half the codes kept; seconds per explanation."""
    from tqdm.auto import tqdm

    from llm_cxr.explain import attribute

    grid = model.map.grid_size
    targets = [t for row in rows for t in targets_of(row, grid)]
    out: dict = {"targets": len(targets), "methods": {}}
    for name, options in methods.items():
        per: dict[str, dict] = {}
        areas = {"deletion": [], "insertion": [], "drop": [], "increase": []}
        seconds = []
        for t in tqdm(targets, desc=f"explain {name}", disable=not progress):
            stated = model.stated_findings(t.codes[None])
            case = image_to_report(model, t.codes, t.phrase, None, stated[0] if stated else None)
            t0 = time.perf_counter()
            scores = attribute(model, case, name, **options)
            seconds.append(time.perf_counter() - t0)
            m = scores.reshape(grid, grid).numpy()
            row = per.setdefault(t.finding, {"n": 0, "hits": 0, "mass": 0.0})
            row["n"] += 1
            row["hits"] += int(pointing_game(m, t.cells))
            row["mass"] += mass_in_mask(m, t.cells)
            if name in faithfulness:
                curves = deletion_insertion(model.cxr, case, scores)
                areas["deletion"].append(curves["deletion_area"])
                areas["insertion"].append(curves["insertion_area"])
                change = confidence_change(model.cxr, case, scores)
                areas["drop"].append(change["drop"])
                areas["increase"].append(change["increase"])
        total = sum(r["n"] for r in per.values())
        out["methods"][name] = {
            "pointing": sum(r["hits"] for r in per.values()) / max(total, 1),
            "mass_in_mask": sum(r["mass"] for r in per.values()) / max(total, 1),
            "per_finding": {k: {"n": r["n"], "pointing": r["hits"] / r["n"], "mass_in_mask": r["mass"] / r["n"]}
                            for k, r in sorted(per.items())},
            "seconds_per_explanation": float(np.mean(seconds)) if seconds else None}
        if areas["deletion"]:
            out["methods"][name] |= {"deletion_area": float(np.mean(areas["deletion"])),
                                     "insertion_area": float(np.mean(areas["insertion"])),
                                     "confidence_drop": float(np.mean(areas["drop"])),
                                     "confidence_increase": float(np.mean(areas["increase"]))}
    return out


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
        for row, t in tqdm(targets, desc=f"explain drawings {name}", disable=not progress):
            region = torch.as_tensor(t.cells.reshape(-1))
            stated = stated_for_drawing(model, row["report"])  # as generation prompts the drawing
            case = report_to_image(model, row["report"], t.codes, stated, region,
                                   plan_for(model, row["report"], stated))
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
            "n": n, "word_mass": sum(r["mass"] for r in per.values()) / max(n, 1),
            "chance": sum(r["chance"] for r in per.values()) / max(n, 1),
            "top_word": sum(r["top"] for r in per.values()) / max(n, 1),
            "per_finding": {k: {"n": r["n"], "word_mass": r["mass"] / r["n"], "chance": r["chance"] / r["n"],
                                "top_word": r["top"] / r["n"]} for k, r in sorted(per.items())}}
    return out


__all__ = ["FINDING_WORDS", "FOCAL", "Target", "evaluate_drawings", "evaluate_methods", "targets_of", "word_mass"]
