"""LoRA adapters on any causal LM (Hu et al., ICLR 2022), with the new image-token rows trainable.

LoRA targets are found by walking the model for the linear layers of its blocks, and the rows of the new image
tokens are trained through peft's ``trainable_token_indices`` in the input embeddings and, when untied, the output
head. Full fine-tuning, what LLM-CXR did, is the alternative (``full_finetune: true``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llm_cxr.configs import option
from llm_cxr.errors import ConfigError
from llm_cxr.lm.run import trainable_summary
from llm_cxr.lm.tokens import ImageTokenMap

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters (``lora:``); Hu et al., ICLR 2022."""

    r: int = option(16, help='rank of the adapters')
    alpha: int = option(32, help='scale: the update is (alpha / r) * B A')
    dropout: float = option(0.05, help='dropout on the adapters\' input')
    target_modules: list[str] | str = option("auto", help='"auto": every linear layer inside the transformer blocks')
    train_new_tokens: bool = option(True, help='the image-token rows of the input embeddings and output head')

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be > 0, got {self.r} and {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            self.target_modules = [self.target_modules]


def pick_attention(choice: str | None, device, mixed_precision: str) -> str | None:
    """transformers' attention implementation for training: ``auto`` = eager for bf16/fp16 on CPU, else SDPA.

    On CPU the SDPA (flash) kernel gains nothing from bf16 while the eager matmuls do: measured
    in benchmarks/results/lm_train.md (small preset, 8,289 vs 7,502 tokens/s). Elsewhere SDPA.
    """
    if choice not in (None, "auto"):
        return choice
    on_cpu = torch.device(device).type == "cpu"
    return "eager" if on_cpu and mixed_precision in ("bf16", "fp16") else "sdpa"


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def embedding_names(model) -> tuple[str, str | None]:
    """Module names of the input embeddings and of the output head (None when tied to the input)."""
    names = _module_names(model)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    in_name = names[id(inp)].split(".")[-1]
    if out is None or out.weight is inp.weight:
        return in_name, None
    return in_name, names[id(out)].split(".")[-1]


def auto_lora_targets(model) -> list[str]:
    """Names (last component) of the linear layers inside the blocks: attention and MLP projections."""
    out_head = model.get_output_embeddings()
    found: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not out_head and any(ch.isdigit() for ch in name.split(".")):
            leaf = name.split(".")[-1]
            if leaf not in found:
                found.append(leaf)
    if not found:
        raise ConfigError(f"found no linear layers inside the blocks of {type(model).__name__}; "
                          f"give lora.target_modules explicitly")
    return found


def check_lora_targets(model, targets: list[str]) -> None:
    leaves = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
                          f"its linear layers are {sorted(leaves)}")


def apply_lora(model, token_map: ImageTokenMap | None, settings: LoraSettings):
    """Wrap ``model`` with LoRA adapters; the image-token rows are trainable in both embeddings."""
    from peft import LoraConfig, get_peft_model

    targets = auto_lora_targets(model) if settings.target_modules == "auto" else list(settings.target_modules)
    check_lora_targets(model, targets)
    trainable_tokens = None
    if settings.train_new_tokens and token_map is not None:
        ids = list(token_map.image_ids) + [token_map.begin_id, token_map.end_id]
        in_name, out_name = embedding_names(model)
        trainable_tokens = {in_name: ids} if out_name is None else {in_name: ids, out_name: ids}
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                     trainable_token_indices=trainable_tokens, task_type="CAUSAL_LM")
    from llm_cxr.lm.run import peft_wrapping

    with peft_wrapping():
        peft_model = get_peft_model(model, cfg)
    log.info("LoRA r=%d on %s; %s", settings.r, targets, trainable_summary(peft_model))
    return peft_model
