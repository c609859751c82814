"""The image plan: where on the grid a drawn image should show the findings its report asks for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import AddOn, register


@dataclass
class PlanConfig:
    items: list[str]  # guide items with a map each (llm_cxr.lm.prompts.PLAN_ITEMS when it was made)
    slots: int  # H*W
    dim: int  # the LM's embedding width
    rank: int = 16


@register("plan")
class ImagePlan(AddOn):
    """Layout conditioning for an image the model draws: one learned (H*W, rank) map per guide item (a finding,
    bare or with its side: :data:`llm_cxr.lm.prompts.PLAN_ITEMS`), summed over the items a report asks for and
    projected to the embedding width, added to every token of the image being generated.

    A report -> image prompt that lists its findings (``image_guided``) says *what* to draw; which grid slots
    must show it the LM has to work out from attention to a list hundreds of tokens back, and the small
    preset's LM barely did (image finding micro-F1 0.27 with the list, 0.25 without). The plan puts "a left
    effusion belongs here" on the slot itself. Training learns the maps from the images of studies with each
    finding; at inference the same items come from the report (:func:`llm_cxr.lm.prompts.requested_findings`) or
    the caller. The maps start at zero (the plan adds nothing until trained); ``proj`` starts large enough that
    a map entry of ``unit`` gives the embedding rows' spread, so Adam's steps of ~lr move the maps at a useful
    pace."""

    def __init__(self, items, slots: int, dim: int, rank: int = 16, row_std: float = 0.02, unit: float = 0.005):
        super().__init__()
        self.items = tuple(items)
        self.index = {item: i for i, item in enumerate(self.items)}
        self.rank = int(rank)
        self.maps = nn.Parameter(torch.zeros(len(self.items), slots, self.rank))
        self.proj = nn.Linear(self.rank, dim, bias=False)
        nn.init.normal_(self.proj.weight, std=row_std / (unit * self.rank ** 0.5))

    Config = PlanConfig

    @property
    def config(self) -> PlanConfig:
        return PlanConfig(list(self.items), self.maps.shape[1], self.proj.out_features, self.rank)

    @classmethod
    def from_config(cls, c: PlanConfig) -> ImagePlan:
        return cls(c.items, c.slots, c.dim, c.rank)

    def loaded(self, state: dict[str, torch.Tensor]) -> ImagePlan:
        """The saved maps, grown to today's items (a plan saved before items were added draws as before)."""
        from llm_cxr.lm.prompts import PLAN_ITEMS

        self.load_state_dict(state)
        return self.grown(PLAN_ITEMS)

    def contribution(self, ids, image, token_map, dtype):
        """The layout at the slots of the drawn image's tokens (``image.drawn``), from ``image.plan`` or its
        precomputed ``image.layout``; None without either."""
        if image.drawn is None or (image.plan is None and image.layout is None):
            return None
        layout = image.layout if image.layout is not None else self.layout(image.plan.to(ids.device))
        return self(layout, image.slots).to(dtype) * image.drawn.unsqueeze(-1).to(dtype)

    def grown(self, items) -> ImagePlan:
        """This plan with a map for each of ``items``, whose first items must be this plan's: a plan saved before
        items were added (new ones start at zero, so it draws as before). Itself if it has them all."""
        items = tuple(items)
        if items == self.items:
            return self
        if items[:len(self.items)] != self.items:
            raise ConfigError(f"an image plan for items {', '.join(self.items[:4])}... cannot take the items "
                              f"{', '.join(items[:4])}...: they are not a continuation of its own")
        out = ImagePlan(items, self.maps.shape[1], self.proj.out_features, self.rank)
        with torch.no_grad():  # its maps start at zero
            out.maps[:len(self.items)] = self.maps
            out.proj.weight.copy_(self.proj.weight)
        return out.to(self.maps.device, self.maps.dtype)

    def vector(self, lists) -> torch.Tensor:
        """Guide items per image (lists of ``"name"`` / ``"name:side"``; None or [] = no plan) -> (B, items)
        multi-hot. An item the plan has no map for is an error."""
        out = torch.zeros(len(lists), len(self.items))
        for b, items in enumerate(lists):
            for item in items or ():
                if item not in self.index:
                    raise ConfigError(f"the image plan has no map for {item!r}; it knows {', '.join(self.items)}")
                out[b, self.index[item]] = 1.0
        return out

    def layout(self, plan: torch.Tensor) -> torch.Tensor:
        """plan (B, items) -> (B, H*W, rank): each row's summed maps. A drawing's layout is the same at every
        step, so decoding computes it once (:meth:`ImagePositionEmbedding.embed`'s ``layout``)."""
        return torch.einsum("bp,psr->bsr", plan.to(self.maps.dtype), self.maps)

    def forward(self, layout: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """layout (B, H*W, rank) from :meth:`layout`, slots (B, T) -> (B, T, dim): the layout at the slots (a slot
        < 0 reads slot 0; the caller masks it), picked before the projection so that a decoding step projects one
        slot."""
        return self.proj(layout.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, self.rank)))
