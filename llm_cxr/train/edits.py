"""Edit training for the finding head: some of each batch's images are edited as an explanation's deletion test
edits them, and the targets say what the edit left.

A deletion test (llm_cxr.explain.metrics) replaces codes by a neutral one and re-reads the image. A head that has
only seen whole images reads an edited one as something new: on the demo's model, 20% of the codes replaced at
random added findings to the head's reading in 8 of 10 test studies, so a deletion measured the damage any edit
does rather than what a map found. ROAR (Hooker et al., NeurIPS 2019) retrains on the degraded images for this
reason; here the head trains on such edits from the start, with targets that stay true:

* away from every finding: a random share of the cells outside all findings' masks (dilated by one cell) is set to
  the image's most frequent code; the targets do not change;
* a whole finding: the cells of one present finding's mask (dilated), where no other present finding lies, are set
  to that code; the finding becomes absent, its side unknown.

Needs the dataset's ``masks`` (the synthetic generator's); without them no image is edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llm_cxr.data.masks import dilate, mask_cells


@dataclass
class CodeEdits:
    cells: torch.Tensor  # (N, K, H*W) bool: each finding's cells, dilated, per training image
    share: float  # of each batch's images edited
    max_background: float = 0.5  # at most this share of the cells away from findings is replaced

    @classmethod
    def from_rows(cls, rows, names: Sequence[str], grid: int, share: float) -> CodeEdits | None:
        """From a dataset's ``masks`` column (None when it has none or ``share`` is 0)."""
        if share <= 0 or "masks" not in rows.column_names:
            return None
        index = {n: k for k, n in enumerate(names)}
        cells = torch.zeros(len(rows), len(names), grid * grid, dtype=torch.bool)
        for i, masks in enumerate(rows["masks"]):
            for m in masks or ():
                k = index.get(m.get("finding"))
                if k is not None and m.get("mask") is not None:
                    cells[i, k] |= torch.from_numpy(dilate(mask_cells(m["mask"], grid)).reshape(-1))
        return cls(cells, share)

    def apply(self, codes: torch.Tensor, idx: torch.Tensor, present: torch.Tensor, left: torch.Tensor,
              right: torch.Tensor, gen: torch.Generator):
        """Edit a share of the batch ``codes`` (B, H*W) of training images ``idx``; returns the codes and the
        targets (B, K) as edited (copies)."""
        codes, present, left, right = codes.clone(), present.clone(), left.clone(), right.clone()
        cells = self.cells[idx]
        for b in torch.nonzero(torch.rand(len(idx), generator=gen) < self.share).squeeze(1).tolist():
            fill = codes[b].mode().values
            on = present[b] == 1
            taken = cells[b][on].any(0)  # the present findings' cells (none: all False)
            alone = [k for k in torch.nonzero(on & cells[b].any(1)).squeeze(1).tolist()
                     if not bool((cells[b, k] & cells[b][on & (torch.arange(len(on)) != k)].any(0)).any())]
            if alone and float(torch.rand(1, generator=gen)) < 0.5:
                k = alone[int(torch.randint(len(alone), (1,), generator=gen))]
                codes[b, cells[b, k]] = fill
                present[b, k], left[b, k], right[b, k] = 0, -1, -1
            else:
                free = torch.nonzero(~taken).squeeze(1)
                n = int(float(torch.rand(1, generator=gen)) * self.max_background * len(free))
                codes[b, free[torch.randperm(len(free), generator=gen)[:n]]] = fill
        return codes, present, left, right


__all__ = ["CodeEdits"]
