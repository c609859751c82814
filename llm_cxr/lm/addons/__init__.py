"""Add-ons: optional modules that add to the LM's image-token inputs, or read the codes beside it.

Each add-on is an ``nn.Module`` registered by name (``@register("reader")``) with a typed config (a dataclass,
``module.config``), a constructor from that config, ``attach(model, token_map)`` and, for those that feed the LM,
``contribution(ids, image)``: what it adds to the input embeddings of a batch, given the batch's explicit
:class:`~llm_cxr.lm.sequence.ImageInputs`. A run records the add-ons it has in ``run.json`` (``addons``: name and
config, in order) and saves each in ``addon_NAME.safetensors``; :func:`load_addons` iterates that list.

Registered: ``positions`` (where a code sits in the grid), ``reader`` (a CNN over a prompt image's codebook
vectors), ``plan`` (where a drawn image should show the findings asked for), ``finding_head`` (a classifier over the
codes whose reading a guided prompt states).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from llm_cxr.configs import from_dict_strict
from llm_cxr.errors import ConfigError

REGISTRY: dict[str, type[AddOn]] = {}
ORDER = ("positions", "reader", "plan", "finding_head")  # the order their contributions are summed in


def register(name: str) -> Callable[[type[AddOn]], type[AddOn]]:
    def deco(cls: type[AddOn]) -> type[AddOn]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ConfigError(f"an add-on named {name!r} is registered already ({REGISTRY[name].__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


class AddOn(nn.Module):
    """Base of the add-ons. Subclasses set ``Config`` (a dataclass) and build themselves from one."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    @property
    def config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config) -> AddOn:
        raise NotImplementedError

    def attach(self, model, token_map) -> None:
        """Put the add-on where the model uses it (default: the image-input wrapper of its embeddings)."""
        from llm_cxr.lm.addons.positions import attach

        attach(model, token_map, **{self.name: self})

    def contribution(self, ids: torch.Tensor, image, token_map, dtype: torch.dtype) -> torch.Tensor | None:
        """What it adds to the embeddings (B, T, D) of ids (B, T) with their image inputs; None: nothing."""
        return None

    def loaded(self, state: dict[str, torch.Tensor]) -> AddOn:
        """Load a saved state (strictly); subclasses convert older states here."""
        self.load_state_dict(state)
        return self


def addon_file(name: str) -> str:
    return f"addon_{name}.safetensors"


def record(addon: AddOn) -> dict[str, Any]:
    """The add-on's entry in ``run.json``."""
    return {"name": addon.name, "config": dataclasses.asdict(addon.config)}


def save_addon(addon: AddOn, folder: str | Path) -> Path:
    """``addon_NAME.safetensors`` (tensors in fp32, the config in the metadata), written atomically."""
    from safetensors.torch import save_file

    path = Path(folder) / addon_file(addon.name)
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in addon.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(dataclasses.asdict(addon.config))})
    tmp.replace(path)
    return path


def build_addon(entry: dict[str, Any]) -> AddOn:
    """A new add-on from a ``run.json`` entry (name and config), or a ConfigError naming what is wrong."""
    _register_builtins()
    name = entry.get("name")
    if name not in REGISTRY:
        raise ConfigError(f"unknown add-on {name!r} (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    return cls.from_config(from_dict_strict(cls.Config, dict(entry.get("config") or {}), f"addon {name}"))


def load_addon(entry: dict[str, Any], folder: str | Path) -> AddOn:
    """The add-on that ``entry`` describes, with its weights from ``folder``."""
    from safetensors.torch import load_file

    path = Path(folder) / addon_file(entry.get("name", "?"))
    addon = build_addon(entry)
    if not path.exists():
        raise ConfigError(f"{folder}: run.json lists the add-on {addon.name!r} but {path.name} is missing")
    try:
        return addon.loaded(load_file(str(path)))
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a valid {addon.name!r} add-on: {e}") from e


def _register_builtins() -> None:
    from llm_cxr.lm.addons import head, plan, positions, reader  # noqa: F401  (they register themselves)


__all__ = ["ORDER", "REGISTRY", "AddOn", "addon_file", "build_addon", "load_addon", "record", "register",
           "save_addon"]
