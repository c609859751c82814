"""The second route from an image to a guided report's sentence: the finding head.

A run that writes checklist-guided reports (the `small` preset) states in its prompt the findings its finding head
read from the codes, and the LM writes from that list. A sentence such as "Small left pleural effusion." then comes
from the image twice: through the LM's own reading of the image tokens, and through the head's decision that a left
effusion is there. A bottleneck on the LM's image positions alone explains the first route only.

Here the second route gets its own bottleneck, on what the head reads (the codebook vectors of the codes on the
grid), with the head's own likelihood of the decisions the sentence depends on as the fitting term: each finding the
sentence mentions (read by the report labeler), present or absent as the sentence says, and on its side. The two
maps are min-max normalised and mixed in proportion to what each route is worth to the sentence
(:func:`route_weights`): how much the sentence's log-likelihood falls when that route alone is cut. In a guided run
the LM mostly copies the stated list, so the head's route carries most of it (the deletion test on the full
pipeline, llm_cxr.explain.metrics, is what showed it).
"""

from __future__ import annotations

import torch

from llm_cxr.explain.m2ib import M2IBSettings, bottleneck, without_information

# The head's bottleneck, chosen on the synthetic validation split (benchmarks/results/explain_tuning_demo.md and
# 2026-12-07-explain-stated-sentences.md): a smaller
# step for longer (M2IB's lr 1 x 10 steps moves alpha in coarse jumps) and a stronger pressure on information.
HEAD_SETTINGS = {"beta": 3.0, "lr": 0.3, "steps": 30}


def head_decisions(head, sentence: str) -> dict[str, tuple[bool, str | None]]:
    """The head's findings that ``sentence`` states, as (present, side): "No pneumothorax." -> absent pneumothorax."""
    from llm_cxr.data.labeler import label_report

    res = label_report(sentence)
    sides = {f.name: f.laterality for f in res.findings}
    out = {}
    for name in head.names:
        v = res.labels.get(name)
        if v in (0, 1):
            side = sides.get(name) if v == 1 else None
            out[name] = (v == 1, side if side in ("left", "right", "bilateral") else None)
    return out


def _fit(logits: torch.Tensor, head, decisions) -> torch.Tensor:
    """Mean log-likelihood, under the head's logits (N, 3, K), of the decisions: (N,)."""
    from llm_cxr.lm.addons.head import side_bits

    terms = []
    index = {n: k for k, n in enumerate(head.names)}
    for name, (present, side) in decisions.items():
        k = index[name]
        terms.append(torch.nn.functional.logsigmoid(logits[:, 0, k] if present else -logits[:, 0, k]))
        if present and side and bool(head.sided[k]):
            for j, bit in enumerate(side_bits(side), start=1):
                terms.append(torch.nn.functional.logsigmoid(logits[:, j, k] if bit else -logits[:, j, k]))
    return torch.stack(terms, 1).mean(1)


def m2ib_head(head, codes: torch.Tensor, decisions: dict, settings: M2IBSettings | None = None) -> torch.Tensor:
    """(H*W,) attribution of the head's route: M2IB on the codebook vectors it reads, fitting its own decisions."""
    s = settings or M2IBSettings()
    v = head.vectors(codes.reshape(1, -1).to(head.codebook.device)).detach().float()  # (1, C, H, W)
    grid = v.shape[-1]

    def fit(z: torch.Tensor) -> torch.Tensor:  # z (N, H*W, C)
        return _fit(head.from_vectors(z.transpose(1, 2).reshape(len(z), -1, grid, grid)), head, decisions)

    return bottleneck(v[0].flatten(1).T, fit, s)


@torch.no_grad()
def route_weights(model, case, decisions: dict, settings: M2IBSettings | None = None) -> tuple[float, float]:
    """What each route is worth to the case's target, each as the fall of its mean log-likelihood when that route
    alone is cut, in the way it carries information: the LM's image positions replaced by the bottleneck's noise
    at its block (:func:`~llm_cxr.explain.m2ib.without_information`), and the finding head's decisions that the
    sentence states taken out of the prompt's list (the LM's image kept). Each >= 0."""
    from llm_cxr.explain.cases import with_codes
    from llm_cxr.explain.metrics import _batched
    from llm_cxr.lm.prompts import split_item

    full = float(_batched(model.cxr, case, case.ids)[0])
    lm_cut = without_information(model.cxr, case, settings)
    present = {name for name, (yes, _) in decisions.items() if yes}
    kept = [item for item in case.stated if split_item(item)[0] not in present]
    codes = case.ids[0, case.sources] - model.map.first_id
    head_cut = with_codes(model, case, codes, kept)
    head_score = float(_batched(model.cxr, head_cut, head_cut.ids)[0])
    return max(0.0, full - lm_cut), max(0.0, full - head_score)


@torch.no_grad()
def plan_route(model, case, report: str, stated: list[str], settings: M2IBSettings | None = None):
    """A guided drawing's second route: the image plan lays out the stated findings (``plan_items``), apart from
    the LM's reading of the list. Each item's worth to the target through it is the fall of the target's
    log-likelihood when the item (and its zone) leaves the plan; it is spread over that item's list tokens, so that
    :func:`~llm_cxr.explain.word_map` hands it to the words the item was read from. Returns (token scores (S,),
    (the LM route's weight, the plan's)), the weights as in :func:`route_weights`: the LM's sources cut by the
    bottleneck's noise, the plan emptied."""
    from dataclasses import replace

    from llm_cxr.explain.metrics import _batched
    from llm_cxr.lm.addons.positions import find
    from llm_cxr.lm.prompts import plan_items

    plan = find(model.model).plan

    def scored(items: list[str]) -> float:
        vector = plan.vector([plan_items(items, report)]) if items else torch.zeros_like(case.image.plan)
        other = replace(case, image=replace(case.image, plan=vector.to(case.image.plan), layout=None))
        return float(_batched(model.cxr, other, other.ids)[0])

    full = float(_batched(model.cxr, case, case.ids)[0])
    scores = torch.zeros(len(case.sources))
    item_of = torch.as_tensor(case.item_of)
    for k in range(len(stated)):
        tokens = item_of == k
        if bool(tokens.any()):
            scores[tokens] = max(0.0, full - scored(stated[:k] + stated[k + 1:])) / int(tokens.sum())
    weights = (max(0.0, full - without_information(model.cxr, case, settings)), max(0.0, full - scored([])))
    return scores, weights


def _norm(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalised: a map over the grid, whose peak is what the pointing game reads."""
    m = m.float()
    return (m - m.min()) / (m.max() - m.min()) if float(m.max() - m.min()) > 0 else torch.zeros_like(m)


def share(m: torch.Tensor) -> torch.Tensor:
    """As a share of its (non-negative) total: token scores, which are summed into words."""
    m = m.float().clamp_min(0)
    return m / m.sum() if float(m.sum()) > 0 else m


def combine(lm_map: torch.Tensor, other: torch.Tensor | None, weights: tuple[float, float] = (1.0, 1.0),
            scale=_norm) -> torch.Tensor:
    """The LM's route's map and another route's (the head's, the plan's), each scaled (``scale``), mixed by
    ``weights`` (equal when both are 0); the LM's alone when there is no other."""
    if other is None:
        return scale(lm_map)
    w_lm, w_other = weights if sum(weights) > 0 else (1.0, 1.0)
    return (w_lm * scale(lm_map) + w_other * scale(other)) / (w_lm + w_other)


__all__ = ["HEAD_SETTINGS", "combine", "head_decisions", "m2ib_head", "plan_route", "route_weights", "share"]
