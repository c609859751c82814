"""The sequence the model reads, and the one tokenisation that training and inference share.

A sequence is token ids (text, image spans ``<image> code... </image>``, the response, the end key, EOS) plus
what the add-ons need to know about them: which tokens are image codes and in which grid slot, which images are
*read* (prompt images, which the image reader sees whole) and which one is *drawn* (the response's image, which
the image plan lays out, and which must never be read whole: that would leak later codes). :func:`encode_example`
and :func:`encode_prompt` make the ids, :class:`ImageInputs` says the rest explicitly, and :func:`collate` makes
a padded :class:`Batch`; :class:`llm_cxr.lm.model.CXRModel` computes logits from a batch and nothing else.
A prompt is encoded by the same functions for training and generation, so the two can never disagree.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.prompts import PLAN_ITEMS, Example, ImageSlot, PromptTemplate
from llm_cxr.lm.tokens import ImageTokenMap

# --------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # tokens before the response; only the response carries the loss
    truncated: bool = False


# text -> ids per tokenizer: a study's examples repeat its report, and every study the same instructions and
# questions, so most calls repeat a text seen before. Keyed by the vocabulary size too: adding tokens (the image
# tokens) can change how a text splits.
_IDS_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, dict[str, tuple[int, ...]]]]" = weakref.WeakKeyDictionary()
_IDS_CACHE_SIZE = 50_000  # entries (texts up to a report long): tens of MB at most


def _text_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    try:
        n_vocab, cache = _IDS_CACHE.get(tokenizer, (-1, {}))
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if n_vocab != len(tokenizer) or len(cache) >= _IDS_CACHE_SIZE:
        cache = {}
        _IDS_CACHE[tokenizer] = (len(tokenizer), cache)
    ids = cache.get(text)
    if ids is None:
        ids = cache[text] = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(ids)


def image_span(token_map: ImageTokenMap, codes: Sequence[int]) -> list[int]:
    codes = np.asarray(codes).reshape(-1)
    if codes.size != token_map.tokens_per_image:
        raise InputError(f"an image needs {token_map.tokens_per_image} codes ({token_map.grid_size}x"
                         f"{token_map.grid_size}) for this model; got {codes.size}")
    return [token_map.begin_id, *token_map.codes_to_ids(torch.as_tensor(codes)).tolist(), token_map.end_id]


def encode_prompt(tokenizer, token_map: ImageTokenMap, parts: Sequence, codes: Sequence[int] | None = None,
                  max_text: int | None = None) -> tuple[list[int], bool]:
    """Prompt parts -> ids. The report (the second of three or more parts: instruction, report, ..., response key)
    may be cut to ``max_text`` tokens; a findings list after it never is."""
    ids: list[int] = []
    truncated = False
    for i, part in enumerate(parts):
        if isinstance(part, ImageSlot):
            if codes is None:
                raise InputError("this prompt has an image slot but no image codes were given")
            ids += image_span(token_map, codes)
            continue
        piece = _text_ids(tokenizer, part)
        if max_text is not None and i == 1 and len(parts) > 2 and len(piece) > max_text:
            piece, truncated = piece[:max_text], True
        ids += piece
    return ids, truncated


def image_prompt_ids(tokenizer, token_map: ImageTokenMap, template: PromptTemplate, parts: Sequence,
                     max_length: int) -> tuple[list[int], bool]:
    """Ids of a report -> image prompt that leaves room in ``max_length`` for the whole image response (image span,
    end key, EOS), and whether its report was cut for that. Training and generation cut a report alike."""
    room = max_length - (token_map.tokens_per_image + 2) - len(_text_ids(tokenizer, template.end_key)) - 1
    prompt, _ = encode_prompt(tokenizer, token_map, parts)
    over = len(prompt) - room
    if over <= 0:
        return prompt, False
    report_len = len(_text_ids(tokenizer, parts[1])) if len(parts) > 2 else 0
    if report_len - over < 8:
        raise InputError(f"max_length={max_length} cannot hold an image ({token_map.tokens_per_image} tokens) "
                         f"and its prompt; raise max_length")
    return encode_prompt(tokenizer, token_map, parts, max_text=report_len - over)[0], True


def encode_example(ex: Example, tokenizer, token_map: ImageTokenMap, template: PromptTemplate,
                   max_length: int) -> Encoded:
    """Token ids of a whole example (prompt, response, end key, EOS), fitted into ``max_length``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token: set tokenizer.eos_token before training")
    end = _text_ids(tokenizer, template.end_key) + [eos]
    if ex.response is None:  # report -> image: the image is the response and is never cut
        prompt, cut = image_prompt_ids(tokenizer, token_map, template, ex.prompt, max_length)
        return Encoded(prompt + image_span(token_map, ex.codes) + end, len(prompt), cut)
    prompt, _ = encode_prompt(tokenizer, token_map, ex.prompt, ex.codes)
    response = _text_ids(tokenizer, ex.response)
    room = max_length - len(prompt) - len(end)
    if room < 1:
        raise InputError(f"max_length={max_length} cannot hold the prompt of a {ex.task!r} example "
                         f"({len(prompt)} tokens); raise max_length")
    truncated = len(response) > room
    return Encoded(prompt + response[:room] + end, len(prompt), truncated)


# --------------------------------------------------------------------------- image inputs and batches


def image_slots(ids: torch.Tensor, token_map: ImageTokenMap) -> torch.Tensor:
    """Slot of every image token inside its span (``<image>`` ... ), -1 elsewhere. ids (B, T) -> (B, T)."""
    is_img = token_map.is_image_id(ids)
    cum = is_img.long().cumsum(-1)
    at_begin = torch.where(ids == token_map.begin_id, cum, torch.zeros_like(cum))
    start = at_begin.cummax(-1).values
    slot = cum - start - 1
    return torch.where(is_img, slot % token_map.tokens_per_image, torch.full_like(slot, -1))


def whole_spans(slots: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """(B, T) bool: the tokens of image spans whose H*W codes are all there, in order (an image being drawn, or
    cut by the context, is not whole)."""
    out = torch.zeros_like(slots, dtype=torch.bool)
    ramp = torch.arange(tokens_per_image, device=slots.device)
    for b, s in (slots == 0).nonzero().tolist():
        if s + tokens_per_image <= slots.shape[1] and bool((slots[b, s:s + tokens_per_image] == ramp).all()):
            out[b, s:s + tokens_per_image] = True
    return out


@dataclass
class ImageInputs:
    """What the add-ons apply to a batch of sequences, per token, given explicitly (never kept as state).

    ``slots`` (B, T) long: grid slot of each image code, -1 elsewhere. ``read`` (B, T) bool: codes of whole prompt
    images (the image reader reads them). ``drawn`` (B, T) bool: codes of the image the response draws (the image
    plan lays them out). ``plan`` (B, items) multi-hot guide items (:data:`~llm_cxr.lm.prompts.PLAN_ITEMS`) of the
    drawn image, or ``layout`` (B, H*W, rank): the plan's layout of it, computed once per drawing."""

    slots: torch.Tensor
    read: torch.Tensor | None = None
    drawn: torch.Tensor | None = None
    plan: torch.Tensor | None = None
    layout: torch.Tensor | None = None

    @classmethod
    def of(cls, ids: torch.Tensor, token_map: ImageTokenMap, n_prompt: torch.Tensor | None = None,
           plan: torch.Tensor | None = None) -> ImageInputs:
        """Inputs of whole sequences ids (B, T) whose responses start at ``n_prompt`` (B,) (None: all prompt): an
        image in the prompt is read, an image in the response is drawn (with ``plan``)."""
        slots = image_slots(ids, token_map)
        is_code = slots >= 0
        if n_prompt is None:
            in_prompt = torch.ones_like(is_code)
        else:
            in_prompt = torch.arange(ids.shape[1], device=ids.device)[None] < n_prompt.to(ids.device)[:, None]
        read = is_code & in_prompt & whole_spans(slots, token_map.tokens_per_image)
        return cls(slots, read, is_code & ~in_prompt, plan)

    @classmethod
    def drawing(cls, ids: torch.Tensor, slot: int, layout: torch.Tensor | None = None) -> ImageInputs:
        """One decoding step of a drawn image: every token of ids (B, 1) is the code of grid ``slot``."""
        return cls(torch.full_like(ids, slot), torch.zeros_like(ids, dtype=torch.bool),
                   torch.ones_like(ids, dtype=torch.bool), layout=layout)

    def to(self, device) -> ImageInputs:
        return ImageInputs(*(None if t is None else t.to(device) for t in
                             (self.slots, self.read, self.drawn, self.plan, self.layout)))

    def rows(self, idx: torch.Tensor) -> ImageInputs:
        return ImageInputs(*(None if t is None else t[idx] for t in
                             (self.slots, self.read, self.drawn, self.plan, self.layout)))


@dataclass
class Batch:
    """Padded sequences: ``input_ids``, ``attention_mask`` (B, T); ``image`` (None for a text-only model);
    ``labels`` (B, T) with -100 off the response, ``weights`` (B, T) per-token loss weights, both for training;
    ``n_prompt`` (B,) where each response starts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image: ImageInputs | None = None
    labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    n_prompt: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.image.to(device) if self.image is not None else None,
                     *(None if t is None else t.to(device) for t in (self.labels, self.weights, self.n_prompt)))

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx],
                     self.image.rows(idx) if self.image is not None else None,
                     *(None if t is None else t[idx] for t in (self.labels, self.weights, self.n_prompt)))

    def with_ids(self, ids: torch.Tensor, token_map: ImageTokenMap | None) -> Batch:
        """The same batch with other ids (same shape and response starts), image inputs derived anew."""
        image = None
        if token_map is not None:
            plan = self.image.plan if self.image is not None else None
            image = ImageInputs.of(ids, token_map, self.n_prompt, plan)
        return Batch(ids, self.attention_mask, image, self.labels, self.weights, self.n_prompt)


def collate(rows: list[dict], pad_id: int, token_map: ImageTokenMap | None = None,
            pad_to_multiple: int = 8) -> Batch:
    """Right-padded :class:`Batch` of encoded sequences (dicts with ``input_ids`` and ``n_prompt``); labels are
    -100 on the prompt and on padding (pad may equal EOS). With a ``token_map`` the batch has its
    :class:`ImageInputs`; rows with a ``plan`` (indices into :data:`~llm_cxr.lm.prompts.PLAN_ITEMS`) give the
    drawn images' plans, rows with ``focus`` cells (``stage.image_focus``) loss ``weights``."""
    longest = max(len(r["input_ids"]) for r in rows)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    n_prompt = torch.as_tensor([int(r["n_prompt"]) for r in rows], dtype=torch.long)  # (B,)
    for i, r in enumerate(rows):
        x = torch.as_tensor(r["input_ids"], dtype=torch.long)
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
        labels[i, r["n_prompt"]:len(x)] = x[r["n_prompt"]:]
    weights = None
    if any(r.get("focus") for r in rows):  # a drawn image's response is <image> + codes: cell k is token n_prompt+1+k
        weights = torch.ones((len(rows), T))
        for i, r in enumerate(rows):
            if r.get("focus"):
                weights[i, r["n_prompt"] + 1 + torch.as_tensor(r["focus"], dtype=torch.long)] = float(r["focus_weight"])
    image = None
    if token_map is not None:
        plan = None
        if any("plan" in r for r in rows):
            plan = torch.zeros((len(rows), len(PLAN_ITEMS)))  # (B, items)
            for i, r in enumerate(rows):
                plan[i, list(r.get("plan") or [])] = 1.0
        image = ImageInputs.of(ids, token_map, n_prompt, plan)
    return Batch(ids, mask, image, labels, weights, n_prompt)
