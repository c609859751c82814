"""Explanations of what the model read and wrote: attribution methods behind one registry.

``explain(model, image=...)`` says which image regions drove each sentence of the report the model writes (or a
phrase the caller gives); ``explain(model, report=...)`` says which words drove the drawing. Methods register by
name (:func:`register`); the CLI's ``--method`` choices come from :data:`METHODS`. Every method reads the model
through its one forward (:class:`~llm_cxr.lm.model.CXRModel`) on the same :class:`~llm_cxr.explain.cases.Case`.

The routes an image takes to a sentence: the LM's own reading of the image tokens, and, for a run that writes
from a findings list (checklist-guided reports), the finding head's reading stated in the prompt. M2IB bottlenecks
both (:mod:`llm_cxr.explain.routes`) and combines their maps (``routes="lm"``: the LM's only); the other methods
attribute the LM's route with the stated list held fixed, and the explanation says so (``notes``).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.explain import baselines
from llm_cxr.explain.cases import (
    IMAGE_TO_REPORT,
    REPORT_TO_IMAGE,
    Case,
    check_target,
    image_to_report,
    plan_for,
    report_to_image,
    sentences,
    stated_for_drawing,
)
from llm_cxr.explain.m2ib import M2IBSettings, m2ib
from llm_cxr.explain.result import Explanation

METHODS: dict[str, Callable] = {}


def register(name: str):
    """``@register("name")`` on ``fn(cxr, case, **options) -> (S,) scores`` for the case's source positions."""
    def deco(fn):
        if name in METHODS:
            raise ConfigError(f"an explanation method named {name!r} is registered already")
        METHODS[name] = fn
        return fn
    return deco


@register("m2ib")
def _m2ib(cxr, case, **options):
    return m2ib(cxr, case, M2IBSettings(**options))


register("random")(baselines.random_scores)
register("occlusion")(baselines.occlusion)
register("gradient_x_input")(baselines.gradient_x_input)
register("integrated_gradients")(baselines.integrated_gradients)
register("attention_rollout")(baselines.attention_rollout)


def explain(model, image=None, report: str | None = None, method: str = "m2ib", target: str | None = None,
            codes: torch.Tensor | None = None, progress: bool = False, written: str | None = None,
            routes: str = "all", **options) -> Explanation:
    """Explain one output of ``model`` (an :class:`~llm_cxr.lm.generation.LLMCXR`).

    ``image`` (a path, PIL image or codes): which of its regions drove each sentence of the report the model
    writes for it (greedy; ``written``: the report it already wrote), or the phrase ``target``. ``report``: which
    of its words drove the image the model draws for it (or the given ``codes``, (H*W,)). ``options`` go to the
    method (M2IB: layer, beta, steps, lr, samples, normalize)."""
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; choose from {', '.join(sorted(METHODS))}")
    if (image is None) == (report is None):
        raise InputError("explain needs exactly one of an image (image -> report) or a report (report -> image)")
    t0 = time.perf_counter()
    cases, ex = (_image_cases(model, image, target, written) if image is not None
                 else _report_cases(model, report, codes))
    from tqdm.auto import tqdm

    maps = []
    was_training = model.cxr.training
    model.cxr.eval()
    try:
        for case in tqdm(cases, desc=f"explain ({method})", disable=not progress):
            maps.append(_shape(case, attribute(model, case, method, routes, **options)))
            if (method == "m2ib" and routes == "all" and case.stated is not None and model.finding_head is not None
                    and case.direction == IMAGE_TO_REPORT):
                note = ("m2ib: the LM's and the finding head's routes, combined (each min-max normalised, weighted by "
                        "what each route is worth to the sentence)")
                if note not in ex.notes:
                    ex.notes.append(note)
    finally:
        model.cxr.train(was_training)
    ex.method, ex.maps, ex.seconds = method, np.stack(maps), time.perf_counter() - t0
    ex.settings = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in options.items()}
    return ex


def attribute(model, case: Case, method: str, routes: str = "all", **options) -> torch.Tensor:
    """(S,) scores of ``method`` for ``case``. M2IB on a guided run's sentence (``routes="all"``) also bottlenecks
    the finding head's route and combines the two maps (:mod:`llm_cxr.explain.routes`); options named ``head_*``
    (``head_beta``, ``head_steps``...) set that route's bottleneck, the others the LM's. On a guided drawing with
    an image plan, it adds what each stated item is worth through the plan."""
    if routes not in ("all", "lm"):
        raise ConfigError(f"routes must be 'all' or 'lm', got {routes!r}")
    head_options = {k[len("head_"):]: v for k, v in options.items() if k.startswith("head_")}
    options = {k: v for k, v in options.items() if not k.startswith("head_")}
    if head_options and method != "m2ib":
        raise ConfigError(f"head_* options are M2IB's (the finding head's route); {method} takes none")
    scores = METHODS[method](model.cxr, case, **options).detach().float().cpu()
    if method != "m2ib" or routes != "all" or case.stated is None:
        return scores
    if case.direction == REPORT_TO_IMAGE:  # a guided drawing: the image plan is the second route
        if case.image is None or case.image.plan is None or not case.stated:
            return scores
        from llm_cxr.explain.routes import combine, plan_route, share

        plan_scores, weights = plan_route(model, case, case.response, case.stated, M2IBSettings(**options))
        return combine(scores, plan_scores, weights, scale=share)
    head = model.finding_head
    if head is None:
        return scores
    from llm_cxr.explain.routes import HEAD_SETTINGS, combine, head_decisions, m2ib_head, route_weights

    decisions = head_decisions(head, case.label)
    if not decisions:
        return combine(scores, None)
    codes = case.ids[0, case.sources] - model.map.first_id
    head_map = m2ib_head(head, codes, decisions, M2IBSettings(**{**HEAD_SETTINGS, **head_options}))
    return combine(scores, head_map, route_weights(model, case, decisions, M2IBSettings(**options)))


def _shape(case: Case, scores: torch.Tensor) -> np.ndarray:
    if case.direction == IMAGE_TO_REPORT:
        return scores.reshape(case.grid, case.grid).numpy()
    return word_map(case, scores)


def word_map(case: Case, scores: torch.Tensor) -> np.ndarray:
    """Per-token scores of a report -> image case summed over the pieces of each word; a guided case's list tokens
    go, item by item, to the words each item was read from (shared equally among them)."""
    scores = scores.float()
    words = torch.zeros(len(case.words))
    word_of = torch.as_tensor(case.word_of, dtype=torch.long)
    own = word_of >= 0
    words.index_add_(0, word_of[own], scores[own])
    item_of = torch.as_tensor(case.item_of, dtype=torch.long)
    for k, evidence in enumerate(case.evidence):
        if evidence:
            words[evidence] += float(scores[item_of == k].sum()) / len(evidence)
    return words.numpy()


def _image_cases(model, image, target: str | None, written: str | None) -> tuple[list[Case], Explanation]:
    from llm_cxr.lm.generation import Sampling

    if isinstance(image, torch.Tensor) and not image.is_floating_point():
        image = image.reshape(1, -1)  # one image's codes, (H, W) or (H*W,)
    codes = model.codes_of(image if isinstance(image, torch.Tensor) else [image])[:1]
    stated = model.stated_findings(codes)
    stated = stated[0] if stated is not None else None
    notes = []
    if stated is not None:
        notes.append("guided run: the prompt states the findings the finding head read; methods other than m2ib "
                     "hold that list fixed and attribute the LM's own reading of the image")
    if target is not None:
        text = check_target(target)
        cases = [image_to_report(model, codes[0], text, None, stated)]
        return cases, Explanation(IMAGE_TO_REPORT, "", [text], np.zeros(0), report=text,
                                  codes=codes[0].tolist(), notes=notes)
    report = written if written is not None else model.generate_report(
        codes, Sampling(), findings=[stated] if stated is not None else None)[0]
    spans = sentences(report)
    if not spans:
        raise InputError(f"the model's report has no sentence to explain: {report!r}")
    cases = [image_to_report(model, codes[0], report, span, stated) for span in spans]
    return cases, Explanation(IMAGE_TO_REPORT, "", [c.label for c in cases], np.zeros(0), report=report,
                              codes=codes[0].tolist(), notes=notes)


def _report_cases(model, report: str, codes: torch.Tensor | None) -> tuple[list[Case], Explanation]:
    report = check_target(report)
    stated = stated_for_drawing(model, report)
    if codes is None:
        # the run's own sampling, seeded: an explained drawing can be drawn again
        codes = model.generate_image([report], model.image_sampling(0),
                                     findings=[stated] if stated is not None else None,
                                     guided=model.guided_images).codes[0]
    plan = plan_for(model, report, stated)
    case = report_to_image(model, report, codes.reshape(-1), stated, plan=plan)
    notes = []
    if case.cut:
        notes.append(f"the report is longer than the run's max_length ({model.max_length} tokens) leaves room for "
                     "with the image: the words past the cut, which the model never read when drawing, get nothing")
    if stated:
        notes.append("guided drawing: the prompt lists the findings read from the report"
                     + (" and the image plan lays them out" if plan is not None else "")
                     + "; each listed item's attribution goes to the words it was read from"
                     + (" (m2ib adds each item's worth through the plan)" if plan is not None else ""))
    ex = Explanation(REPORT_TO_IMAGE, "", [case.label], np.zeros(0), report=report, words=case.words,
                     codes=codes.reshape(-1).tolist(), notes=notes)
    return [case], ex


__all__ = ["METHODS", "Case", "Explanation", "attribute", "explain", "register", "word_map"]
