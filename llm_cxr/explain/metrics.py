"""How good an explanation is: localisation against ground-truth masks, and faithfulness to the model.

* Pointing game (Zhang et al., ECCV 2016): the map's peak falls inside the finding's mask, dilated by one grid cell
  (the codes are 8x8-pixel cells of a 128-px image in the small preset: a peak one cell off is on the finding's edge).
* Mass in mask: the share of the map's (non-negative) attribution inside the finding's cells.
* Deletion / insertion (Petsiuk et al., BMVC 2018): replace the top-k attributed codes by a neutral code (deletion)
  or start from an all-neutral image and put back the top-k (insertion), re-score the target; the area under the
  curve of the target log-likelihood over k. A faithful map makes deletion fall fast (small area) and insertion
  rise fast (large area).
"""

from __future__ import annotations

import numpy as np
import torch

from llm_cxr.explain.baselines import _score

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def mask_cells(mask, grid: int) -> np.ndarray:
    """A pixel mask (PIL image or array, any size) -> (grid, grid) bool: the cells any of its pixels fall in."""
    a = np.asarray(mask)
    if a.ndim == 3:
        a = a[..., 0]
    cells = np.zeros((grid, grid), dtype=bool)
    ys, xs = np.nonzero(a > 0)
    cells[ys * grid // a.shape[0], xs * grid // a.shape[1]] = True
    return cells


def dilate(cells: np.ndarray, by: int = 1) -> np.ndarray:
    out = cells.copy()
    for dy in range(-by, by + 1):
        for dx in range(-by, by + 1):
            out |= np.roll(np.roll(cells, dy, 0), dx, 1) & _inside(cells.shape, dy, dx)
    return out


def _inside(shape, dy: int, dx: int) -> np.ndarray:
    """Cells that a roll by (dy, dx) did not wrap around into."""
    ok = np.ones(shape, dtype=bool)
    if dy > 0:
        ok[:dy] = False
    elif dy < 0:
        ok[dy:] = False
    if dx > 0:
        ok[:, :dx] = False
    elif dx < 0:
        ok[:, dx:] = False
    return ok


def pointing_game(grid_map: np.ndarray, cells: np.ndarray, dilation: int = 1) -> bool:
    """Whether the map's peak (the first, if tied) lies in the finding's cells dilated by ``dilation``."""
    peak = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    return bool(dilate(cells, dilation)[peak])


def mass_in_mask(grid_map: np.ndarray, cells: np.ndarray) -> float:
    m = np.clip(np.asarray(grid_map, dtype=np.float64), 0, None)
    total = m.sum()
    return float(m[cells].sum() / total) if total > 0 else 0.0


@torch.no_grad()
def deletion_insertion(cxr, case, scores: torch.Tensor, fractions=tuple(i / 10 for i in range(11)),
                       neutral: int | None = None) -> dict:
    """Curves of the target's mean log-likelihood as the top-k attributed codes are deleted (replaced by a neutral
    code, the image's most frequent one unless given) or inserted into an all-neutral image; their areas
    (trapezoid over the fraction of codes). For image -> report cases."""
    tmap = cxr.token_map
    src = case.sources
    codes = case.ids[0, src]
    fill = tmap.first_id + (int((codes - tmap.first_id).mode().values) if neutral is None else int(neutral))
    order = torch.argsort(scores.float(), descending=True)
    rows_del, rows_ins = [], []
    for f in fractions:
        top = order[:round(f * len(src))]
        d = case.ids.clone()
        d[0, src[top]] = fill
        i = case.ids.clone()
        i[0, src] = fill
        i[0, src[top]] = codes[top]
        rows_del.append(d)
        rows_ins.append(i)
    dele = _score(cxr, case, torch.cat(rows_del)).cpu().numpy()
    ins = _score(cxr, case, torch.cat(rows_ins)).cpu().numpy()
    x = np.asarray(fractions, dtype=np.float64)
    return {"fractions": x.tolist(), "deletion": dele.tolist(), "insertion": ins.tolist(),
            "deletion_area": float(_trapezoid(dele, x)), "insertion_area": float(_trapezoid(ins, x))}


def confidence_change(cxr, case, scores: torch.Tensor, keep: float = 0.5, neutral: int | None = None) -> dict:
    """The M2IB paper's confidence drop and increase (Wang et al., NeurIPS 2023, after Chattopadhay et al.'s Grad-CAM++
    "average drop" and "increase in confidence", WACV 2018), on codes: keep the top ``keep`` share of the attributed
    codes, make the rest neutral, and compare the target's probability (per token, exp of the mean log-likelihood)
    with that on the whole image. ``drop`` = max(0, p - p_kept) / p (lower is better: the kept regions carry the
    evidence); ``increase`` = whether p_kept > p (averaged over cases it is the share of cases)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    tmap = cxr.token_map
    src = case.sources
    codes = case.ids[0, src]
    fill = tmap.first_id + (int((codes - tmap.first_id).mode().values) if neutral is None else int(neutral))
    top = torch.argsort(scores.float(), descending=True)[:max(1, round(keep * len(src)))]
    kept = case.ids.clone()
    kept[0, src] = fill
    kept[0, src[top]] = codes[top]
    full, part = (float(v) for v in _score(cxr, case, torch.cat([case.ids, kept])).exp())
    return {"keep": keep, "p": full, "p_kept": part, "drop": max(0.0, full - part) / max(full, 1e-12),
            "increase": float(part > full)}


__all__ = ["cascading_randomisation", "confidence_change", "deletion_insertion", "dilate", "mask_cells",
           "mass_in_mask", "pointing_game", "rank_correlation"]


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two maps (ties broken by order)."""
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64).reshape(-1)))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64).reshape(-1)))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def cascading_randomisation(cxr, case, method, seed: int = 0) -> list[dict]:
    """Adebayo et al.'s model-randomisation sanity check (NeurIPS 2018): re-initialise the LM's blocks from the top
    down, one more at a time, and compare each map with the trained model's (rank correlation). A method that
    explains the model gives maps that drift away; one that only reflects the input stays put. ``method(cxr, case)``
    -> (S,) scores. The weights are restored afterwards."""
    from llm_cxr.explain.tail import decoder_layers

    owner, name = decoder_layers(cxr.lm)
    blocks = list(getattr(owner, name))
    saved = [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in blocks]
    reference = method(cxr, case).detach().float().cpu().numpy()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for i, block in enumerate(reversed(blocks)):
            with torch.no_grad():
                for p in block.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * float(p.detach().float().std().clamp_min(1e-3)))
            scores = method(cxr, case).detach().float().cpu().numpy()
            rows.append({"randomised_blocks": i + 1, "rank_correlation": rank_correlation(reference, scores)})
    finally:
        with torch.no_grad():
            for block, state in zip(blocks, saved):
                block.load_state_dict(state)
    return rows
