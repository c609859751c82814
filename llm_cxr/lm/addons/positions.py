"""The image-token inputs of the LM: 2D positions, and the wrapper that applies every add-on.

A causal LM sees an image as 256 tokens in a row; its own position scheme (rotary or learned 1D) says where a
token is in the *sequence*, not where its code sits in the 16x16 grid, and the image span starts at a different
offset in every prompt. The VQ-GAN's codes are local textures whose meaning depends on where they are (a bright
patch at the costophrenic angle is an effusion, in the hilum it is not), so the wrapper adds a learned table of
grid positions to every image token (a 2D sine-cosine start, as ViT's and MAE's position tables, scaled to the
embedding rows). Measurements: benchmarks/results/lm_quality.md.

The add-ons (:class:`~llm_cxr.lm.addons.reader.CodeReader`, :class:`~llm_cxr.lm.addons.plan.ImagePlan`) sit in
the same wrapper and live outside the base model's weights: :func:`save_positions` writes
``image_positions.safetensors`` beside the adapter/weights, :func:`attach` puts it back on load, and
:func:`detached` hides the wrapper while Hugging Face / peft save the model so that their parameter names stay
those of the plain model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import AddOn, register
from llm_cxr.lm.addons.plan import ImagePlan
from llm_cxr.lm.addons.reader import CodeReader
from llm_cxr.lm.sequence import ImageInputs
from llm_cxr.lm.tokens import ImageTokenMap

POSITIONS_FILE = "image_positions.safetensors"  # runs saved before add-ons had a registry


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


@dataclass
class PositionsConfig:
    grid: int  # H (= W)
    dim: int  # the LM's embedding width


@register("positions")
class PositionTable(AddOn):
    """A learned (H*W, D) table: row ``slot`` is added to every image code in grid slot ``slot``."""

    Config = PositionsConfig

    def __init__(self, table: torch.Tensor, grid: int):
        super().__init__()
        self.grid = int(grid)
        self.table = nn.Parameter(table.detach().clone().float())

    @classmethod
    def sincos(cls, grid: int, dim: int, scale: float) -> PositionTable:
        """The start: a 2D sine-cosine table scaled to the spread of the embedding rows."""
        return cls(sincos_2d(grid, dim) * scale, grid)

    @property
    def config(self) -> PositionsConfig:
        return PositionsConfig(self.grid, self.table.shape[1])

    @classmethod
    def from_config(cls, c: PositionsConfig) -> PositionTable:
        return cls(torch.zeros(c.grid * c.grid, c.dim), c.grid)

    def contribution(self, ids, image, token_map, dtype):
        use = image.slots >= 0
        return self.table.to(dtype)[image.slots.clamp(min=0)] * use.unsqueeze(-1).to(dtype)


class ImagePositionEmbedding(nn.Module):
    """The model's input embedding plus what the add-ons give the image tokens: the position table (where a code
    sits in the grid), the image reader's features on prompt images, the image plan's layout on the image being
    drawn (:mod:`llm_cxr.lm.addons`).

    Its call takes the token ids and, explicitly, an :class:`~llm_cxr.lm.sequence.ImageInputs` that says which
    tokens are image codes, in which slot, which images are read and which is drawn, with which plan. Nothing is
    kept between calls, so the same ids and inputs always give the same embeddings, and a hook on this module
    sees every embedding the model computes (training, decoding, attribution). Called with ids alone (a plain
    Hugging Face forward), every complete image span is a prompt image and nothing is drawn."""

    def __init__(self, base: nn.Module, token_map: ImageTokenMap, positions: PositionTable,
                 reader: CodeReader | None = None, plan: ImagePlan | None = None):
        super().__init__()
        self.base = base
        self.token_map = token_map
        self.positions = positions
        self.reader = reader
        self.plan = plan

    @property
    def pos(self) -> nn.Parameter:
        """The position table (H*W, D)."""
        return self.positions.table

    @property
    def addons(self) -> list[AddOn]:
        """The add-ons it applies, in the order their contributions are summed."""
        return [a for a in (self.positions, self.reader, self.plan) if a is not None]

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``get_input_embeddings().weight`` expects
        return self.base.weight

    def text_row_std(self) -> float:
        """The spread of the text tokens' embedding rows: the scale added features start at."""
        return float(self.base.weight.detach()[:self.token_map.first_id].float().std())

    def forward(self, input_ids: torch.Tensor, image: ImageInputs | None = None) -> torch.Tensor:
        """input_ids (B, T) -> embeddings (B, T, D)."""
        e = self.base(input_ids)
        if image is None:
            image = ImageInputs.of(input_ids, self.token_map)
        if not bool((image.slots >= 0).any()):
            return e
        add = None
        for addon in self.addons:
            part = addon.contribution(input_ids, image, self.token_map, e.dtype)
            if part is not None:
                add = part if add is None else add + part
        return e if add is None else e + add


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


def attach(model, token_map: ImageTokenMap, table: torch.Tensor | None = None,
           reader: CodeReader | None = None, plan: ImagePlan | None = None,
           positions: PositionTable | None = None) -> ImagePositionEmbedding:
    """Wrap ``model``'s input embedding (after peft wrapping, if any) with a position table (``positions``, or one
    made from ``table``, or the sine-cosine start). If the model already has the wrapper, a ``reader`` and a
    ``plan`` are added to it (where it has none)."""
    owner = _owner(model)
    emb = owner.get_input_embeddings()
    if isinstance(emb, ImagePositionEmbedding):
        if reader is not None and emb.reader is None:
            _check_width("the image reader", reader.proj.out_features, emb.pos.shape[1])
            emb.reader = reader.to(emb.pos.device)
        if plan is not None and emb.plan is None:
            _check_plan(plan, token_map, emb.pos.shape[1])
            emb.plan = plan.to(emb.pos.device)
        return emb
    weight = emb.weight
    if positions is None and table is not None:
        positions = PositionTable(table, token_map.grid_size)
    if positions is None:
        positions = PositionTable.sincos(token_map.grid_size, weight.shape[1],
                                         float(weight.detach()[:token_map.first_id].float().std()))
    if tuple(positions.table.shape) != (token_map.tokens_per_image, weight.shape[1]):
        raise ConfigError(f"image position table has shape {tuple(positions.table.shape)}, the model needs "
                          f"({token_map.tokens_per_image}, {weight.shape[1]})")
    if reader is not None:
        _check_width("the image reader", reader.proj.out_features, weight.shape[1])
    if plan is not None:
        _check_plan(plan, token_map, weight.shape[1])
    wrapper = ImagePositionEmbedding(emb, token_map, positions.to(weight.device),
                                     reader.to(weight.device) if reader is not None else None,
                                     plan.to(weight.device) if plan is not None else None)
    owner.set_input_embeddings(wrapper)
    return wrapper


def _check_width(what: str, width: int, dim: int) -> None:
    if width != dim:
        raise ConfigError(f"{what} gives {width}-wide features, the model's embeddings are {dim} wide")


def _check_plan(plan: ImagePlan, token_map: ImageTokenMap, dim: int) -> None:
    if plan.maps.shape[1] != token_map.tokens_per_image or plan.proj.out_features != dim:
        raise ConfigError(f"the image plan has {plan.maps.shape[1]} slots of width {plan.proj.out_features}, the "
                          f"model needs {token_map.tokens_per_image} of width {dim}")


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


def load_legacy_positions(folder: str | Path) -> list[AddOn]:
    """The add-ons of a run saved before they had a registry (one ``image_positions.safetensors`` holding the
    table, and the reader and plan if any): converted on load, in the order :func:`attach` takes them."""
    from safetensors import safe_open

    path = Path(folder) / POSITIONS_FILE
    if not path.exists():
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        table = tensors["pos"]
        out: list[AddOn] = [PositionTable(table, int(round(table.shape[0] ** 0.5)))]
        if "reader" in meta:
            cfg = json.loads(meta["reader"])
            state = {k[len("reader."):]: v for k, v in tensors.items() if k.startswith("reader.")}
            reader = CodeReader(state["codebook"], cfg["grid"], cfg["dim"], cfg["width"], cfg["features"],
                                summary=cfg.get("summary", False), regions=tuple(cfg.get("regions", (3, 2))))
            out.append(reader.loaded(state))
        if "plan" in meta:
            cfg = json.loads(meta["plan"])
            plan = ImagePlan(cfg["items"], cfg["slots"], cfg["dim"], cfg["rank"])
            out.append(plan.loaded({k[len("plan."):]: v for k, v in tensors.items() if k.startswith("plan.")}))
        return out
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a valid image position table: {e}") from e
