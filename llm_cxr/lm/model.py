"""The one forward pass: logits of a batch of sequences, with the image add-ons applied from the batch.

Training loss, evaluation loss, every decoding step, probes and explanation methods all call
:meth:`CXRModel.forward` (nanoGPT's single ``forward``; Hugging Face's ``model(input_ids, ...)``
contract), so what is measured, perturbed or hooked is exactly what produced an output. The input
embeddings are always computed by calling the model's input-embedding module (a hook on
``model.get_input_embeddings()`` fires for every token the model sees, also while an image is drawn
one code at a time), with the sequence's :class:`~llm_cxr.lm.sequence.ImageInputs` passed explicitly.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from llm_cxr.lm.addons.positions import ImagePositionEmbedding
from llm_cxr.lm.sequence import Batch, ImageInputs
from llm_cxr.lm.tokens import ImageTokenMap


def _accepts(model, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes kwargs on
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


class CXRModel(nn.Module):
    """A causal LM (plain, peft or merged) with its image-token map: ``forward`` is the model's one function.

    ``lm`` keeps its own parameter names (save it, merge it, wrap it with accelerate through this module)."""

    def __init__(self, lm: nn.Module, token_map: ImageTokenMap | None = None):
        super().__init__()
        self.lm = lm
        self.token_map = token_map
        self._keep_arg = _accepts(lm, "logits_to_keep")
        # transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` is deprecated there)
        self._cache_arg = "cache" if _accepts(lm, "cache") else "past_key_values"

    @property
    def config(self):
        return self.lm.config

    def embed(self, input_ids: torch.Tensor, image: ImageInputs | None = None) -> torch.Tensor:
        """Input embeddings (B, T, D), through the input-embedding module's call (hooks fire)."""
        emb = self.lm.get_input_embeddings()
        if isinstance(emb, ImagePositionEmbedding):
            return emb(input_ids, image)
        return emb(input_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image: ImageInputs | None = None, position_ids: torch.Tensor | None = None,
                cache=None, use_cache: bool = False, logits_to_keep: int = 0,
                output_hidden_states: bool = False, inputs_embeds: torch.Tensor | None = None,
                output_attentions: bool = False, positions: torch.Tensor | None = None):
        """The LM's output (``logits`` (B, T, V), the KV cache (:func:`cache_of`), ``hidden_states`` /
        ``attentions`` on request) for ids (B, T).

        ``image``: the sequences' image inputs (None: derived from the ids, every whole image a prompt image).
        ``logits_to_keep``: only the last positions' logits (decoding needs one). ``inputs_embeds``: embeddings
        to use instead of embedding ``input_ids`` (an attribution method that perturbs them). ``positions``
        (B, T) bool: the logits of these positions only, as (1, N, V) in row-major order (a loss needs no
        others, and the output head is a small model's largest matrix)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image)
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep and self._keep_arg else {}
        if cache is not None:
            extra[self._cache_arg] = cache
        if output_attentions:
            extra["output_attentions"] = True
        only = (_only_positions(self.lm.get_output_embeddings(), positions) if positions is not None
                else contextlib.nullcontext())
        with only:
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, output_hidden_states=output_hidden_states, **extra)
        if logits_to_keep and not extra:
            out.logits = out.logits[:, -logits_to_keep:]
        return out

    def batch_forward(self, batch: Batch, **kwargs):
        """:meth:`forward` of a :class:`~llm_cxr.lm.sequence.Batch`."""
        return self(batch.input_ids, batch.attention_mask, batch.image, **kwargs)

    def token_logprobs(self, batch: Batch, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T-1) log-probability of each next token ``input_ids[:, 1:]`` given the tokens before it, teacher
        forced; ``allowed`` (V,) adds 0 / -inf per vocabulary entry first (the constraint decoding applies)."""
        logits = self.batch_forward(batch).logits[:, :-1].float()
        if allowed is not None:
            logits = logits + allowed.to(logits.device)[:logits.shape[-1]]
        return logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)


@contextlib.contextmanager
def _only_positions(head: nn.Module, positions: torch.Tensor):
    """While inside, ``head`` (the output embeddings) sees only the hidden states at ``positions``, flattened to
    (1, N, D). What a model does to its logits after the head (scaling, soft-capping) is elementwise and still
    applies."""
    def select(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != positions.shape:
            raise ValueError(f"positions {tuple(positions.shape)} do not match the hidden states "
                             f"{tuple(hidden.shape[:2])}")
        return hidden[positions.to(hidden.device)].unsqueeze(0)

    def keep(_module, args, kwargs):
        if args:
            return (select(args[0]), *args[1:]), kwargs
        name = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))  # called as head(input=...)
        return args, {**kwargs, name: select(kwargs[name])}

    handle = head.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def cache_of(out):
    """The KV cache in a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def response_loss(model: CXRModel, batch: Batch, mode: str = "token") -> torch.Tensor:
    """Cross-entropy of the response tokens (``labels != -100``), weighted by ``batch.weights`` if any. ``mode``
    "token": their mean over the batch; "example": averaged over each example's response tokens first, then over
    the examples that have any. Only the positions that predict a response token go through the output head."""
    target = batch.labels[:, 1:]
    scored = target != -100  # (B, T-1): position t predicts token t + 1
    positions = torch.zeros_like(batch.labels, dtype=torch.bool)
    positions[:, :-1] = scored
    # model(...), not model.batch_forward(...): under DDP only the wrapper's own call synchronises gradients
    logits = model(batch.input_ids, batch.attention_mask, batch.image, positions=positions).logits[0].float()
    per_token = nn.functional.cross_entropy(logits, target[scored], reduction="none")  # (N,)
    w = batch.weights[:, 1:][scored].to(per_token) if batch.weights is not None else torch.ones_like(per_token)
    if mode == "token":
        return (per_token * w).sum() / w.sum().clamp_min(1e-9)
    row = scored.nonzero()[:, 0]  # the example of each scored position
    total = torch.zeros(len(scored), device=w.device, dtype=w.dtype).index_add(0, row, per_token * w)
    n = torch.zeros(len(scored), device=w.device, dtype=w.dtype).index_add(0, row, w)
    return (total[n > 0] / n[n > 0]).mean()


__all__ = ["CXRModel", "cache_of", "response_loss"]
