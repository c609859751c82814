"""Explanations measured on a dataset with ground-truth masks (the synthetic generator's): for every focal finding of
every study, each method explains the phrase that names it (with its side, as MS-CXR grounds phrases in boxes), and
the map is scored for localisation (pointing game, mass in mask) and faithfulness (deletion / insertion).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from llm_cxr.data.schema import DEVICES, findings_from_json
from llm_cxr.explain.cases import image_to_report
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


__all__ = ["FOCAL", "Target", "evaluate_methods", "targets_of"]
