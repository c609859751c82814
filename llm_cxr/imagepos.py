"""2D position embeddings for the image tokens.

A causal LM sees an image as 256 tokens in a row; its own position scheme (rotary or learned
1D) says where a token is in the *sequence*, not where its code sits in the 16x16 grid, and
the image span starts at a different offset in every prompt. The VQ-GAN's codes are local
textures whose meaning depends on where they are (a bright patch at the costophrenic angle is
an effusion, in the hilum it is not), so a reader must learn position x code interactions.
Measured on the synthetic set: a GPT-NeoX trained to answer yes/no questions from the codes
stays at the majority answer after 800 steps without them and reads cardiomegaly, effusion
and tubes (0.96-0.98) by 1,000 steps with them.

:class:`ImagePositionEmbedding` wraps the model's input embedding: every image token gets
``pos[slot]`` added, where ``slot`` (0 .. H*W-1) is its index inside the span that starts at
the last ``<image>`` token. Slots are derived from the ids, so the model's own forward (training,
prefill, attribution) needs nothing extra; incremental decoding, which feeds one token at a time,
passes the slots explicitly (:meth:`ImagePositionEmbedding.embed`). The table starts as a 2D sine-cosine pattern at the
scale of the embedding rows and is trained with the rest.

It lives outside the base model's weights: :func:`save_positions` writes
``image_positions.safetensors`` beside the adapter/weights, :func:`attach` puts it back on load,
and :func:`detached` hides the wrapper while Hugging Face / peft save the model so that their
parameter names stay those of the plain model.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from llm_cxr.errors import ConfigError
from llm_cxr.tokens import ImageTokenMap

POSITIONS_FILE = "image_positions.safetensors"


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) sine-cosine table of (row, column), standardised to unit std."""
    quarter = max(1, dim // 4)
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rr, cc = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (rr.reshape(-1), cc.reshape(-1)):
        ang = coord[:, None] * freq[None, :] * (math.pi / 2)
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < dim:
        table = torch.cat([table, torch.zeros(table.shape[0], dim - table.shape[1])], dim=1)
    table = table[:, :dim]
    return (table - table.mean()) / table.std().clamp(min=1e-6)


def image_slots(ids: torch.Tensor, token_map: ImageTokenMap) -> torch.Tensor:
    """Slot of every image token inside its span (``<image>`` ... ), -1 elsewhere. ids (B, T) -> (B, T)."""
    is_img = (ids >= token_map.first_id) & (ids < token_map.first_id + token_map.n_codes)
    cum = is_img.long().cumsum(-1)
    at_begin = torch.where(ids == token_map.begin_id, cum, torch.zeros_like(cum))
    start = at_begin.cummax(-1).values
    slot = cum - start - 1
    slot = torch.where(is_img, slot % token_map.tokens_per_image, torch.full_like(slot, -1))
    return slot


class ImagePositionEmbedding(nn.Module):
    """The model's input embedding plus a learned (H*W, d) table added to image tokens."""

    def __init__(self, base: nn.Module, token_map: ImageTokenMap, table: torch.Tensor):
        super().__init__()
        self.base = base
        self.token_map = token_map
        self.pos = nn.Parameter(table.detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``get_input_embeddings().weight`` expects
        return self.base.weight

    def embed(self, input_ids: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``input_ids`` (B, T); ``slots`` (B, T) overrides the slots derived from the ids."""
        e = self.base(input_ids)
        if slots is None:
            slots = image_slots(input_ids, self.token_map)
        use = slots >= 0
        if not bool(use.any()):
            return e
        add = self.pos.to(e.dtype)[slots.clamp(min=0)] * use.unsqueeze(-1).to(e.dtype)
        return e + add

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def find(model) -> ImagePositionEmbedding | None:
    """The wrapper on ``model`` (plain, peft or accelerate-wrapped), or None."""
    for m in model.modules():
        if isinstance(m, ImagePositionEmbedding):
            return m
    return None


def _owner(model):
    """The transformers model whose ``set_input_embeddings`` to use (under peft / DDP wrappers)."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def attach(model, token_map: ImageTokenMap, table: torch.Tensor | None = None) -> ImagePositionEmbedding:
    """Wrap ``model``'s input embedding (after peft wrapping, if any); ``table`` None = the sin-cos start."""
    owner = _owner(model)
    emb = owner.get_input_embeddings()
    if isinstance(emb, ImagePositionEmbedding):
        return emb
    weight = emb.weight
    if table is None:
        rows = weight.detach()[:token_map.first_id].float()
        table = sincos_2d(token_map.grid_size, weight.shape[1]) * rows.std()
    if tuple(table.shape) != (token_map.tokens_per_image, weight.shape[1]):
        raise ConfigError(f"image position table has shape {tuple(table.shape)}, the model needs "
                          f"({token_map.tokens_per_image}, {weight.shape[1]})")
    wrapper = ImagePositionEmbedding(emb, token_map, table.to(device=weight.device, dtype=torch.float32))
    owner.set_input_embeddings(wrapper)
    return wrapper


@contextlib.contextmanager
def detached(model):
    """Temporarily put the plain embedding back (saving with transformers/peft); yields the wrapper or None."""
    owner = _owner(model)
    wrapper = owner.get_input_embeddings()
    if not isinstance(wrapper, ImagePositionEmbedding):
        yield None
        return
    owner.set_input_embeddings(wrapper.base)
    try:
        yield wrapper
    finally:
        owner.set_input_embeddings(wrapper)


def save_positions(wrapper: ImagePositionEmbedding, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / POSITIONS_FILE
    save_file({"pos": wrapper.pos.detach().float().cpu().contiguous()}, str(path))
    return path


def load_positions(folder: str | Path) -> torch.Tensor | None:
    """The saved table, or None if the run has no image position embeddings."""
    from safetensors.torch import load_file

    path = Path(folder) / POSITIONS_FILE
    if not path.exists():
        return None
    try:
        return load_file(str(path))["pos"]
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a valid image position table: {e}") from e


__all__ = ["ImagePositionEmbedding", "POSITIONS_FILE", "attach", "detached", "find", "image_slots",
           "load_positions", "save_positions", "sincos_2d"]
