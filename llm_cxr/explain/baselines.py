"""Baselines beside M2IB, through the same cases and the same forward: random, occlusion of code positions,
gradient x input and integrated gradients (Sundararajan et al., ICML 2017) on the input embeddings, and attention
rollout (Abnar & Zuidema, ACL 2020). Written here on :class:`~llm_cxr.lm.model.CXRModel` rather than through
captum: every method needs the same two things, a target log-likelihood and the embeddings of the attributed
positions, which the one forward gives directly (captum's ``LLMAttribution`` would re-tokenise the prompt and miss
the image inputs)."""

from __future__ import annotations

import torch

from llm_cxr.errors import InputError
from llm_cxr.explain.cases import IMAGE_TO_REPORT
from llm_cxr.explain.m2ib import fitting


def random_scores(cxr, case, seed: int = 0) -> torch.Tensor:
    return torch.rand(len(case.sources), generator=torch.Generator().manual_seed(seed))


def _score(cxr, case, ids: torch.Tensor) -> torch.Tensor:
    """Target log-likelihood (N,) of each row of ``ids`` (N, T), image inputs derived as the case's."""
    n = ids.shape[0]
    image = None
    if case.image is not None:
        image = case.image.rows(torch.zeros(n, dtype=torch.long))
    return fitting(cxr(ids, torch.ones_like(ids), image).logits, case.ids, case.target)


@torch.no_grad()
def occlusion(cxr, case, patch: int = 1, neutral: int | None = None, batch_size: int = 32) -> torch.Tensor:
    """Drop in the target log-likelihood when a patch x patch block of codes is replaced by a neutral code (the
    image's most frequent one unless given): each position gets the drops of the patches covering it."""
    if case.direction != IMAGE_TO_REPORT:
        raise InputError("occlusion is measured over an image's codes: explain an image -> report case")
    tmap = cxr.token_map
    g = case.grid
    src = case.sources
    codes = case.ids[0, src] - tmap.first_id
    fill = int(codes.mode().values) if neutral is None else int(neutral)
    base = float(_score(cxr, case, case.ids)[0])
    starts = [(r, c) for r in range(0, g, patch) for c in range(0, g, patch)]
    drops = torch.zeros(g, g)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        ids = case.ids.repeat(len(chunk), 1)
        for j, (r, c) in enumerate(chunk):
            cells = [rr * g + cc for rr in range(r, min(g, r + patch)) for cc in range(c, min(g, c + patch))]
            ids[j, src[cells]] = tmap.first_id + fill
        scores = _score(cxr, case, ids)
        for j, (r, c) in enumerate(chunk):
            drops[r:r + patch, c:c + patch] += base - float(scores[j])
    return drops.reshape(-1)


def _embeddings(cxr, case) -> torch.Tensor:
    with torch.no_grad():
        return cxr.embed(case.ids, case.image).detach().float()


def _score_embeds(cxr, case, embeds: torch.Tensor) -> torch.Tensor:
    n = embeds.shape[0]
    out = cxr(case.ids.expand(n, -1), torch.ones(n, case.ids.shape[1], dtype=torch.long),
              inputs_embeds=embeds.to(cxr.lm.dtype))
    return fitting(out.logits, case.ids, case.target)


def gradient_x_input(cxr, case) -> torch.Tensor:
    """|sum over features of gradient x embedding| at each attributed position."""
    e = _embeddings(cxr, case).requires_grad_(True)
    _score_embeds(cxr, case, e).sum().backward()
    return (e.grad[0] * e.detach()[0]).sum(-1)[case.sources].abs()


def integrated_gradients(cxr, case, steps: int = 16, batch_size: int = 8) -> torch.Tensor:
    """Integrated gradients from a baseline where the attributed positions' embeddings are zero (the rest kept),
    Riemann midpoints over ``steps``; |sum over features| per position."""
    e = _embeddings(cxr, case)
    base = e.clone()
    base[0, case.sources] = 0
    total = torch.zeros_like(e[0])
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    for i in range(0, steps, batch_size):
        a = alphas[i:i + batch_size, None, None]
        path = (base + a * (e - base)).requires_grad_(True)
        _score_embeds(cxr, case, path).sum().backward()
        total += path.grad.sum(0)
    return ((e - base)[0] * total / steps).sum(-1)[case.sources].abs()


@torch.no_grad()
def attention_rollout(cxr, case) -> torch.Tensor:
    """Attention rollout: per block, the heads' mean attention plus the identity (the residual), rows normalised,
    multiplied through the blocks; the target positions' rows, summed, read at the attributed positions."""
    lm = cxr.lm
    previous = getattr(lm.config, "_attn_implementation", None)
    lm.set_attn_implementation("eager")  # the fused kernels return no attention weights
    try:
        out = cxr(case.ids, torch.ones_like(case.ids), case.image, output_attentions=True)
    finally:
        if previous is not None:
            lm.set_attn_implementation(previous)
    if not out.attentions:
        raise InputError(f"{type(lm).__name__} returned no attention weights; attention rollout needs them")
    T = case.ids.shape[1]
    roll = torch.eye(T)
    for att in out.attentions:
        a = att[0].float().mean(0).cpu() + torch.eye(T)
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    rows = case.target.nonzero().squeeze(1)  # logits at row j predict token j + 1
    return roll[rows][:, case.sources].sum(0)


__all__ = ["attention_rollout", "gradient_x_input", "integrated_gradients", "occlusion", "random_scores"]
