"""Finding masks on the code grid: which cells of a VQ-GAN's H x W grid a pixel mask covers (the synthetic
generator's masks, or a box drawn by a reader). Explanations are scored against them (llm_cxr.explain.metrics), and
the finding head's edit training keeps clear of them (llm_cxr.train.edits)."""

from __future__ import annotations

import numpy as np


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


__all__ = ["dilate", "mask_cells"]
