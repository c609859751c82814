"""Batches for training: length-grouped, sharded across processes, resumable mid-epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from llm_cxr.errors import DatasetError
from llm_cxr.lm.sequence import Batch, collate
from llm_cxr.lm.tokens import ImageTokenMap

# --------------------------------------------------------------------------- batching


@dataclass
class LengthGroupedBatches:
    """Batches of similar length: shuffle, sort inside mega-batches of ``group`` batches, shuffle batches.

    ``rank``/``world`` shard the batch order so every process sees different, equally many batches.
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int = 0
    group: int = 50
    rank: int = 0
    world: int = 1
    grouped: bool = True

    def epoch(self, epoch: int) -> list[list[int]]:
        g = np.random.default_rng(self.seed + 1000 * epoch)
        order = g.permutation(len(self.lengths))
        lengths = np.asarray(self.lengths)
        batches: list[list[int]] = []
        span = self.batch_size * self.group
        for s in range(0, len(order), span):
            chunk = order[s:s + span]
            if self.grouped:
                chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches[:1]
        g.shuffle(batches)
        usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
        return batches[self.rank:usable:self.world]

    def __len__(self) -> int:
        n = max(1, len(self.lengths) // self.batch_size)
        return max(1, n // self.world)


def lengths_of(tok_ds) -> np.ndarray:
    return np.asarray(tok_ds.select_columns(["length"]).with_format("numpy")[:]["length"])


def iterate_batches(tok_ds, sampler: LengthGroupedBatches, pad_id: int, start_epoch: int = 0,
                    skip: int = 0, plan: bool = False,
                    token_map: ImageTokenMap | None = None) -> Iterator[tuple[int, int, Batch]]:
    """Endless (epoch, index in epoch, :class:`~llm_cxr.lm.sequence.Batch`) stream; ``skip`` batches of
    ``start_epoch`` are passed over (resume). ``plan``: batches carry the drawn images' plans; ``token_map``: their
    image inputs (see :func:`llm_cxr.lm.sequence.collate`)."""
    cols = ["input_ids", "n_prompt"] + (["plan"] if plan else [])
    cols += [c for c in ("focus", "focus_weight") if c in tok_ds.column_names]
    if plan and "plan" not in tok_ds.column_names:
        raise DatasetError("these tokenised examples have no 'plan' column (made by an older llm-cxr): tokenise again")
    data = tok_ds.select_columns(cols)
    epoch = start_epoch
    while True:
        for b, idx in enumerate(sampler.epoch(epoch)):
            if epoch == start_epoch and b < skip:
                continue
            batch = data[idx]
            yield epoch, b, collate([dict(zip(cols, r)) for r in zip(*(batch[c] for c in cols))], pad_id, token_map)
        epoch += 1
