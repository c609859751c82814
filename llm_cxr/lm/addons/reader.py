"""The image reader: a small CNN over the VQ-GAN codebook vectors of a whole prompt image.

Its per-slot features are added to that image's tokens, giving the LM the locality prior a transformer lacks and
must otherwise learn from scratch (the small preset's reading probe: benchmarks/results/lm_quality.md). It sees an
image all at once, so it is applied only to images in the prompt (``ImageInputs.read``); an image the model draws
never passes through it, so nothing leaks from later codes. It is pretrained as a finding classifier before the
LM stage (:func:`llm_cxr.train.addons.pretrain_reader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_cxr.lm.addons import AddOn, register


def conv_trunk(channels: int, width: int, features: int) -> nn.Sequential:
    """Three 3x3 convolutions over a grid of codebook vectors: (N, channels, H, W) -> (N, features, H, W)."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.GELU(), nn.Conv2d(width, features, 3, padding=1), nn.GELU())


def code_maps(codebook: torch.Tensor, codes: torch.Tensor, grid: int) -> torch.Tensor:
    """codes (N, H*W) -> their codebook vectors as an image (N, C, H, W)."""
    return codebook[codes.long()].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class CodeCNN(AddOn):
    """The trunk the image reader and the finding head share: the VQ-GAN's codebook vectors of an image's codes,
    laid out on the grid, through three 3x3 convolutions; max-pooled over a (rows, columns) grid of regions where
    a whole-image reading is wanted, so that left and right stay apart."""

    def __init__(self, codebook: torch.Tensor, grid: int, width: int = 64, features: int = 128,
                 regions: tuple[int, int] = (3, 2)):
        super().__init__()
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        self.grid, self.width, self.n_features = grid, width, features
        self.regions = (int(regions[0]), int(regions[1]))
        self.register_buffer("codebook", codebook.detach().clone())
        self.trunk = conv_trunk(codebook.shape[1], width, features)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, H*W) -> feature maps (N, features, H, W)."""
        return self.trunk(self.vectors(codes))

    def vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, H*W) -> their codebook vectors on the grid (N, C, H, W): what the trunk reads (an attribution
        method may perturb them and call :meth:`trunk` itself)."""
        return code_maps(self.codebook, codes, self.grid)

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, features, H, W) -> (N, features * rows * columns), max over each region."""
        return nn.functional.adaptive_max_pool2d(maps, self.regions).flatten(1)


@dataclass
class ReaderConfig:
    grid: int
    dim: int  # the LM's embedding width
    codebook: list[int] = field(default_factory=lambda: [0, 0])  # (codes, codebook vector width)
    width: int = 64
    features: int = 128
    summary: bool = False  # also a summary of the whole image on the </image> token that closes it
    regions: list[int] = field(default_factory=lambda: [3, 2])


@register("reader")
class CodeReader(CodeCNN):
    """A CNN over the codebook vectors of a whole prompt image: codes (N, H*W) -> (N, H*W, dim) to add to its tokens.

    With ``summary`` it also gives one (N, dim) vector per image, its features max-pooled over the regions, added
    to the ``</image>`` token that closes it: what the image shows, and roughly where, at one position (the small
    preset's reading probe: benchmarks/results/2026-11-small-preset-history.md)."""

    Config = ReaderConfig

    def __init__(self, codebook: torch.Tensor, grid: int, dim: int, width: int = 64, features: int = 128,
                 summary: bool = False, regions: tuple[int, int] = (3, 2)):
        super().__init__(codebook, grid, width, features, regions)
        self.proj = nn.Linear(features, dim)
        self.sum_proj = nn.Linear(features * self.regions[0] * self.regions[1], dim) if summary else None

    @property
    def config(self) -> ReaderConfig:
        return ReaderConfig(self.grid, self.proj.out_features, list(self.codebook.shape), self.width,
                            self.n_features, self.sum_proj is not None, list(self.regions))

    @classmethod
    def from_config(cls, c: ReaderConfig) -> CodeReader:
        return cls(torch.zeros(*c.codebook), c.grid, c.dim, c.width, c.features, c.summary, tuple(c.regions))

    def read(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codes (N, H*W) -> (per-slot features (N, H*W, dim), summary (N, dim) or None)."""
        maps = self.features(codes)
        slots = self.proj(maps.flatten(2).transpose(1, 2))
        return slots, (self.sum_proj(self.pooled(maps)) if self.sum_proj is not None else None)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.read(codes)[0]

    def contribution(self, ids, image, token_map, dtype):
        """Features at the slots of every read image span (whole spans only, ``image.read``), and the summary on
        the ``</image>`` that closes it; None when no image is read."""
        if image.read is None or not bool(image.read.any()):
            return None
        hw = token_map.tokens_per_image
        out = torch.zeros(*ids.shape, self.proj.out_features, dtype=dtype, device=ids.device)  # (B, T, D)
        spans = [(b, s) for b, s in ((image.slots == 0) & image.read).nonzero().tolist() if s + hw <= ids.shape[1]]
        if not spans:
            return out
        codes = torch.stack([ids[b, s:s + hw] for b, s in spans]) - token_map.first_id
        feats, summary = self.read(codes)
        for i, (b, s) in enumerate(spans):
            out[b, s:s + hw] = feats[i].to(dtype)
            if summary is not None and s + hw < ids.shape[1] and int(ids[b, s + hw]) == token_map.end_id:
                out[b, s + hw] = summary[i].to(dtype)
        return out
