"""How good an explanation is: localisation against ground-truth masks, and faithfulness to the model.

* Pointing game (Zhang et al., ECCV 2016): the map's peak falls inside the finding's mask, dilated by one grid cell
  (the codes are 8x8-pixel cells of a 128-px image in the small preset: a peak one cell off is on the finding's edge).
* Mass in mask: the share of the map's (non-negative) attribution inside the finding's cells.
* Deletion / insertion (Petsiuk et al., BMVC 2018): replace the top-k attributed codes by a neutral code (deletion)
  or start from an all-neutral image and put back the top-k (insertion), re-score the target through the pipeline
  as it runs (a guided run re-reads the changed codes with its finding head); the area under the curve of the
  target's probability rescaled between the all-neutral image (0) and the whole one (1), over k. A faithful map
  makes deletion fall fast (small area) and insertion rise fast (large area).
"""

from __future__ import annotations

import numpy as np
import torch

from llm_cxr.data.masks import dilate, mask_cells
from llm_cxr.explain.baselines import _score
from llm_cxr.explain.cases import IMAGE_TO_REPORT, with_codes

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def pointing_game(grid_map: np.ndarray, cells: np.ndarray, dilation: int = 1) -> bool:
    """Whether the map's peak (the first, if tied) lies in the finding's cells dilated by ``dilation``."""
    peak = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    return bool(dilate(cells, dilation)[peak])


def mass_in_mask(grid_map: np.ndarray, cells: np.ndarray) -> float:
    m = np.clip(np.asarray(grid_map, dtype=np.float64), 0, None)
    total = m.sum()
    return float(m[cells].sum() / total) if total > 0 else 0.0


def pipeline_scores(model, case, codes: torch.Tensor, pipeline: bool = True) -> np.ndarray:
    """Target mean log-likelihood (N,) of ``case`` with its image's codes replaced by each row of ``codes``
    (N, H*W). ``pipeline``: as the run would produce the output from those codes, i.e. a guided run's prompt
    states what its finding head reads from *them* (a deletion that removes a finding from the head's reading
    removes it from the prompt too); otherwise the case's stated list is held fixed (the LM's own route only)."""
    tmap = model.map
    codes = codes.reshape(len(codes), -1).long()
    if not pipeline or case.stated is None or case.direction != IMAGE_TO_REPORT:
        ids = case.ids.repeat(len(codes), 1)
        ids[:, case.sources] = tmap.first_id + codes.to(ids)
        return _batched(model.cxr, case, ids)
    stated = model.stated_findings(codes, guided=True)
    out = np.zeros(len(codes))
    groups: dict[tuple, list[int]] = {}
    for i, items in enumerate(stated):
        groups.setdefault(tuple(items), []).append(i)
    for items, rows in groups.items():
        other = with_codes(model, case, codes[rows[0]], list(items))
        ids = other.ids.repeat(len(rows), 1)
        ids[:, other.sources] = tmap.first_id + codes[rows].to(ids)
        out[rows] = _batched(model.cxr, other, ids)
    return out


@torch.no_grad()
def _batched(cxr, case, ids: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    return np.concatenate([_score(cxr, case, ids[i:i + batch_size]).float().cpu().numpy()
                           for i in range(0, len(ids), batch_size)])


def _neutral(case, neutral: int | None, first_id: int) -> int:
    """The code that stands for "nothing here": the image's most frequent one (its background) unless given."""
    return int((case.ids[0, case.sources] - first_id).mode().values) if neutral is None else int(neutral)


@torch.no_grad()
def deletion_insertion(model, case, scores: torch.Tensor, fractions=tuple(i / 10 for i in range(11)),
                       neutral: int | None = None, pipeline: bool = True) -> dict:
    """Curves of the target as the top-k attributed codes are deleted (replaced by a neutral code) or inserted into
    an all-neutral image, re-scored through the pipeline (:func:`pipeline_scores`); each is the mean
    log-likelihood per step. Their areas (trapezoid over the fraction of codes) are of the target's per-token
    probability rescaled to the evidence the image adds: (p_k - p_blank) / (p_full - p_blank), 1 on the whole
    image, 0 on the all-neutral one. A sentence keeps some probability without its finding (its other words), so
    unscaled curves of every map end on the same plateau and the areas mostly measure it. A case whose whole
    image does not make the target more likely than the blank one has no evidence to delete: its areas are None.
    For image -> report cases."""
    first = model.map.first_id
    codes = case.ids[0, case.sources] - first
    fill = _neutral(case, neutral, first)
    order = torch.argsort(scores.float(), descending=True)
    rows_del, rows_ins = [], []
    for f in fractions:
        top = order[:round(f * len(codes))]
        d, i = codes.clone(), torch.full_like(codes, fill)
        d[top] = fill
        i[top] = codes[top]
        rows_del.append(d)
        rows_ins.append(i)
    scored = pipeline_scores(model, case, torch.stack(rows_del + rows_ins + [codes, torch.full_like(codes, fill)]),
                             pipeline)
    n = len(fractions)
    dele, ins, full, blank = scored[:n], scored[n:2 * n], float(scored[-2]), float(scored[-1])
    x = np.asarray(fractions, dtype=np.float64)
    out = {"fractions": x.tolist(), "deletion": dele.tolist(), "insertion": ins.tolist(), "full": full,
           "blank": blank, "deletion_area": None, "insertion_area": None}
    evidence = np.exp(full) - np.exp(blank)
    if evidence > 1e-6 * np.exp(full):
        out["deletion_area"] = float(_trapezoid((np.exp(dele) - np.exp(blank)) / evidence, x))
        out["insertion_area"] = float(_trapezoid((np.exp(ins) - np.exp(blank)) / evidence, x))
    return out


def confidence_change(model, case, scores: torch.Tensor, keep: float = 0.5, neutral: int | None = None,
                      pipeline: bool = True) -> dict:
    """The M2IB paper's confidence drop and increase (Wang et al., NeurIPS 2023, after Chattopadhay et al.'s Grad-CAM++
    "average drop" and "increase in confidence", WACV 2018), on codes: keep the top ``keep`` share of the attributed
    codes, make the rest neutral, and compare the target's probability (per token, exp of the mean log-likelihood)
    with that on the whole image, both through the pipeline. ``drop`` = max(0, p - p_kept) / p (lower is better:
    the kept regions carry the evidence); ``increase`` = whether p_kept > p (averaged: the share of cases)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    first = model.map.first_id
    codes = case.ids[0, case.sources] - first
    top = torch.argsort(scores.float(), descending=True)[:max(1, round(keep * len(codes)))]
    kept = torch.full_like(codes, _neutral(case, neutral, first))
    kept[top] = codes[top]
    full, part = (float(v) for v in np.exp(pipeline_scores(model, case, torch.stack([codes, kept]), pipeline)))
    return {"keep": keep, "p": full, "p_kept": part, "drop": max(0.0, full - part) / max(full, 1e-12),
            "increase": float(part > full)}


__all__ = ["cascading_randomisation", "confidence_change", "deletion_insertion", "dilate", "mask_cells",
           "mass_in_mask", "pipeline_scores", "pointing_game", "rank_correlation"]


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two maps (ties broken by order)."""
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64).reshape(-1)))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64).reshape(-1)))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def cascading_randomisation(model, case, method, seed: int = 0) -> list[dict]:
    """Adebayo et al.'s model-randomisation sanity check (NeurIPS 2018): re-initialise the LM's blocks from the top
    down, one more at a time, then the finding head (the other route of a guided run), and compare each map with
    the trained model's (rank correlation). A method that explains the model gives maps that drift away; one that
    only reflects the input stays put. ``method(model, case)`` -> (S,) scores. The weights are restored afterwards."""
    from llm_cxr.explain.tail import decoder_layers

    owner, name = decoder_layers(model.cxr.lm)
    blocks = list(getattr(owner, name))
    parts = [(f"LM block {len(blocks) - i}", b) for i, b in enumerate(reversed(blocks))]
    if getattr(model, "finding_head", None) is not None:
        parts.append(("finding head", model.finding_head))
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for _, m in parts]
    reference = method(model, case).detach().float().cpu().numpy()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for i, (label, module) in enumerate(parts):
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * float(p.detach().float().std().clamp_min(1e-3)))
            scores = method(model, case).detach().float().cpu().numpy()
            rows.append({"randomised": i + 1, "last": label, "rank_correlation": rank_correlation(reference, scores)})
    finally:
        with torch.no_grad():
            for (_, module), state in zip(parts, saved):
                module.load_state_dict(state)
    return rows
