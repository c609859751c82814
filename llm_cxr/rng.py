"""Seeds without side effects: library code that must start new weights reproducibly does it inside
:func:`seeded`, which restores the global RNG afterwards; only a run's entry (``train_lm``, ``train_vqgan``,
``train_classifier``, ``pretrain_base``: the functions a command calls, as Hugging Face's Trainer does with
``set_seed``) seeds the global RNG, from the seed in its config."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's global RNG seeded with ``seed``, and give the caller's RNG state back after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
