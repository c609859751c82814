"""A finding classifier over an image's codes: the diagnosis that a checklist-guided report states.

Diagnosis-driven report generation (PromptMRG, Jin et al., AAAI 2024) puts the output of a disease
classification branch into the report generator's prompt. Here the branch is :class:`FindingHead`, a small
CNN over the VQ-GAN codebook vectors of the image's codes (the trunk of
:class:`~llm_cxr.lm.addons.reader.CodeReader`), max-pooled over a (rows, columns) grid of regions so that it can
tell sides apart, with three logits per finding: present, on the left, on the right (both = bilateral).

Why a separate branch: the small LM's own checklist answer states no sides and reads less well than this head
(benchmarks/results/lm_quality.md). It is trained once, before a stage's LM training (``finding_head: conv``;
:mod:`llm_cxr.train.addons`), and frozen: it never sees the LM's loss, and later stages inherit it. It is saved
beside the model as ``finding_head.safetensors``; :meth:`llm_cxr.lm.generation.LLMCXR.read_findings` uses it when
a run has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import addon_file, register, save_addon
from llm_cxr.lm.addons.reader import CodeCNN
from llm_cxr.lm.prompts import split_item

HEAD_FILE = addon_file("finding_head")
LEGACY_HEAD_FILE = "finding_head.safetensors"  # runs saved before add-ons had a registry


@dataclass
class HeadConfig:
    grid: int
    names: list[str]
    codebook: list[int] = field(default_factory=lambda: [0, 0])
    width: int = 64
    features: int = 128
    regions: list[int] = field(default_factory=lambda: [3, 2])
    metrics: dict = field(default_factory=dict)  # held-out metrics recorded when it was trained


@register("finding_head")
class FindingHead(CodeCNN):
    """codes (N, H*W) -> logits (N, 3, K): present / left / right for each of ``names``."""

    Config = HeadConfig

    def __init__(self, codebook: torch.Tensor, grid: int, names: Sequence[str], width: int = 64,
                 features: int = 128, regions: tuple[int, int] = (3, 2)):
        super().__init__(codebook, grid, width, features, regions)
        self.names = list(names)
        self.head = nn.Linear(features * self.regions[0] * self.regions[1], 3 * len(self.names))
        # decision thresholds on the presence probability (chosen on held-out data), and which findings have a side
        self.register_buffer("thresholds", torch.full((len(self.names),), 0.5))
        self.register_buffer("sided", torch.zeros(len(self.names), dtype=torch.bool))
        self.metrics: dict = {}  # held-out metrics from training (saved with it, see load_head)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(self.grid, list(self.names), list(self.codebook.shape), self.width, self.n_features,
                          list(self.regions), dict(self.metrics))

    @classmethod
    def from_config(cls, c: HeadConfig) -> FindingHead:
        head = cls(torch.zeros(*c.codebook), c.grid, c.names, c.width, c.features, tuple(c.regions))
        head.metrics = dict(c.metrics)
        return head

    def loaded(self, state: dict[str, torch.Tensor]) -> FindingHead:
        state = dict(state)
        state["sided"] = state["sided"].bool()  # older files store it as uint8
        self.load_state_dict(state)
        return self.eval()

    def attach(self, model, token_map) -> None:
        """Nothing to attach: the head reads the codes beside the LM (``LLMCXR.read_findings``)."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.from_vectors(self.vectors(codes))

    def from_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Codebook vectors on the grid (N, C, H, W) -> logits (N, 3, K)."""
        maps = self.trunk(vectors)  # (N, features, H, W)
        return self.head(self.pooled(maps)).view(len(vectors), 3, len(self.names))

    @torch.no_grad()
    def probabilities(self, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, K) probabilities: present, left, right."""
        dev = self.codebook.device
        parts = [self(codes[i:i + batch_size].to(dev)).float().sigmoid().cpu()
                 for i in range(0, len(codes), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, 3, len(self.names))

    def predict(self, codes: torch.Tensor, sides: bool = True) -> list[list[str]]:
        """The findings present per image, in ``names`` order: ``"pleural_effusion:right"`` (``sides``) or
        ``"pleural_effusion"``."""
        p = self.probabilities(codes)
        out = []
        for row in p:
            items = []
            for k, name in enumerate(self.names):
                if row[0, k] < self.thresholds[k]:
                    continue
                side = _side(float(row[1, k]), float(row[2, k])) if sides and bool(self.sided[k]) else None
                items.append(f"{name}:{side}" if side else name)
            out.append(items)
        return out

    def agreement(self, codes: torch.Tensor, wanted: Sequence[Sequence[str]]) -> torch.Tensor:
        """(N,) log-likelihood, under the head, that image i shows exactly ``wanted[i]`` (guide items, ``name`` or
        ``name:side``): each of its findings present or absent as asked, and on the side asked. Names the head
        does not know are ignored."""
        p = self.probabilities(codes).clamp(1e-4, 1 - 1e-4)  # (N, 3, K)
        want = torch.zeros(len(codes), 3, len(self.names))  # 1 = asked for, 0 = asked to be absent, -1 = no view
        want[:, 1:] = -1
        index = {n: k for k, n in enumerate(self.names)}
        for i, items in enumerate(wanted):
            for name, side in map(split_item, items):
                if name not in index:
                    continue
                k = index[name]
                want[i, 0, k] = 1
                if side and bool(self.sided[k]):
                    want[i, 1:, k] = torch.tensor(side_bits(side), dtype=want.dtype)
        ll = torch.where(want == 1, p.log(), (1 - p).log())
        return torch.where(want >= 0, ll, torch.zeros_like(ll)).sum((1, 2))


def side_bits(side: str) -> tuple[int, int]:
    """``"left"`` / ``"right"`` / ``"bilateral"`` -> (on the left, on the right)."""
    return int(side in ("left", "bilateral")), int(side in ("right", "bilateral"))


def _side(left: float, right: float) -> str:
    if left >= 0.5 and right >= 0.5:
        return "bilateral"
    return "left" if left >= right else "right"


def save_head(head: FindingHead, folder: str | Path, metrics: dict | None = None) -> Path:
    """Save ``head`` (with its held-out ``metrics``) as the ``finding_head`` add-on of ``folder``."""
    if metrics is not None:
        head.metrics = dict(metrics)
    return save_addon(head, folder)


def load_head(folder: str | Path, device: str | torch.device | None = None) -> FindingHead | None:
    """The finding head saved in ``folder`` (``addon_finding_head.safetensors``, or the file of a run saved before
    add-ons had a registry), or None if there is none."""
    from safetensors import safe_open

    from llm_cxr.lm.addons import load_addon

    folder = Path(folder)
    path = folder / HEAD_FILE if (folder / HEAD_FILE).exists() else folder / LEGACY_HEAD_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = json.loads(meta["config"])
        if path.name == LEGACY_HEAD_FILE:
            cfg["metrics"] = json.loads(meta.get("metrics", "{}"))
            cfg = {k: cfg[k] for k in HeadConfig.__dataclass_fields__ if k in cfg}
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a valid finding head: {e}") from e
    if path.name == LEGACY_HEAD_FILE:
        from safetensors.torch import load_file

        from llm_cxr.lm.addons import build_addon

        try:
            head = build_addon({"name": "finding_head", "config": cfg}).loaded(load_file(str(path)))
        except Exception as e:
            raise ConfigError(f"{path} is not a valid finding head: {e}") from e
    else:
        head = load_addon({"name": "finding_head", "config": cfg}, folder)
    return head.to(device) if device is not None else head
