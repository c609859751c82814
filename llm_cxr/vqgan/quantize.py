"""Vector quantizer (van den Oord et al., "Neural Discrete Representation Learning", 2017),
in the form of taming-transformers' ``VectorQuantizer2``: nearest codebook entry by
squared distance, codebook and commitment losses, straight-through gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from llm_cxr.errors import InputError


class QuantizerOutput(NamedTuple):
    quant: torch.Tensor  # (B, D, h, w) quantized latents (straight-through in training)
    loss: torch.Tensor  # scalar codebook + commitment loss
    indices: torch.Tensor  # (B, h, w) int64 code indices
    perplexity: torch.Tensor  # scalar: exp(entropy) of code usage in this batch


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest codebook entry of each row of ``z_flat`` (N, D)."""
        e = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as taming computes it (same ties, same codes)
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, c, h, w = z.shape
        z_bhwc = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        # distances in fp32 even under autocast: code choice must not depend on precision
        with torch.autocast(device_type=z.device.type, enabled=False):
            idx = self.nearest(z_bhwc.view(-1, c).float())
        z_q = self.embedding(idx).view(z_bhwc.shape).to(z_bhwc.dtype)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z_bhwc) ** 2) + self.beta * torch.mean((z_q - z_bhwc.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z_bhwc) ** 2) + torch.mean((z_q - z_bhwc.detach()) ** 2)
        z_q = z_bhwc + (z_q - z_bhwc).detach()
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return QuantizerOutput(z_q.permute(0, 3, 1, 2).contiguous(), loss, idx.view(b, h, w), perplexity)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> latents (B, D, h, w). Raises InputError for codes outside the codebook."""
        if indices.dtype.is_floating_point:
            raise InputError(f"codes must be integers, got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_embed):
            raise InputError(
                f"codes must lie in [0, {self.n_embed - 1}] (codebook size {self.n_embed}); "
                f"found values from {int(indices.min())} to {int(indices.max())}"
            )
        return self.embedding(indices.long()).permute(0, 3, 1, 2).contiguous()
