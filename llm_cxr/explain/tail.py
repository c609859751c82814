"""Running a causal LM from one of its layers up, and placing hooks that are always removed.

An attribution that perturbs the hidden states at layer L (an information bottleneck) need not recompute the layers
below L at every optimisation step: they see the same input each time. :func:`upper_layers` runs the model with its
decoder's layer list cut to ``layers[L:]`` and the layer-L hidden states given as ``inputs_embeds``; the embedding
step is skipped (Hugging Face decoders take ``inputs_embeds`` as they are, and position information comes from
``position_ids``). Whether that reproduces the full forward is checked on each model (:func:`tail_matches`); where it
does not (a model that rescales ``inputs_embeds``), the naive form is used: a pre-hook on layer L that replaces its
input, with the whole forward run at each step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from llm_cxr.errors import ConfigError


def decoder_layers(lm: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the transformer blocks, the attribute name of their ModuleList): ``gpt_neox.layers``,
    ``model.layers``, ... found by walking the model (plain, peft or merged)."""
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    for module in lm.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and (n is None or len(child) == n) and name in ("layers", "h",
                                                                                                  "blocks"):
                return module, name
    raise ConfigError(f"could not find the transformer blocks of {type(lm).__name__} (a ModuleList 'layers')")


def n_layers(lm: nn.Module) -> int:
    owner, name = decoder_layers(lm)
    return len(getattr(owner, name))


@contextlib.contextmanager
def upper_layers(lm: nn.Module, layer: int) -> Iterator[None]:
    """Within the block, ``lm(inputs_embeds=h)`` runs only blocks ``layer..`` on ``h`` (the input of block
    ``layer``); the full list is put back afterwards, also after an exception."""
    owner, name = decoder_layers(lm)
    full = getattr(owner, name)
    if not 0 <= layer < len(full):
        raise ConfigError(f"layer {layer} is out of range: the model has {len(full)} blocks")
    setattr(owner, name, nn.ModuleList(list(full)[layer:]))
    try:
        yield
    finally:
        setattr(owner, name, full)


@contextlib.contextmanager
def hooks(*registrations: Callable[[], torch.utils.hooks.RemovableHandle]) -> Iterator[list]:
    """Register hooks (each given as a callable that registers one and returns its handle) for the block only:
    every handle is removed in ``finally``."""
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield handles
    finally:
        for h in handles:
            h.remove()


def replace_input(lm: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A registration (for :func:`hooks`) of a pre-hook on block ``layer`` that feeds it ``fn(hidden_states)``."""
    owner, name = decoder_layers(lm)
    block = getattr(owner, name)[layer]

    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return lambda: block.register_forward_pre_hook(pre, with_kwargs=True)


def hidden_at(cxr, batch, layer: int) -> torch.Tensor:
    """(B, T, D) input of block ``layer`` (``hidden_states[layer]``: the embeddings for layer 0)."""
    return cxr.batch_forward(batch, output_hidden_states=True).hidden_states[layer]


def tail_logits(cxr, batch, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits (N, T, V) of blocks ``layer..`` run on ``hidden`` (N, T, D) for the sequences of ``batch``."""
    n = hidden.shape[0]
    mask = batch.attention_mask.expand(n, -1)
    with upper_layers(cxr.lm, layer):
        return cxr.lm(inputs_embeds=hidden, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def tail_matches(cxr, batch, layer: int, atol: float = 1e-4) -> bool:
    """Whether :func:`tail_logits` on the layer's hidden states reproduces the full forward's logits."""
    full = cxr.batch_forward(batch).logits.float()
    tail = tail_logits(cxr, batch, hidden_at(cxr, batch, layer), layer).float()
    return bool(torch.allclose(full, tail, atol=atol, rtol=1e-4))


__all__ = ["decoder_layers", "hidden_at", "hooks", "n_layers", "replace_input", "tail_logits", "tail_matches",
           "upper_layers"]
