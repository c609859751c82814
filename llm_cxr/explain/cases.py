"""What an explanation explains: one sequence through the model's one forward, the positions attributed to, and
the target whose log-likelihood the attribution is about.

* image -> report: the positions are the image's codes (a H x W grid); the target is a span of the report the model
  wrote (a sentence), or a phrase the user types, given the image (and, for a guided run, the findings list its
  finding head read: the prompt is the one the report was written from).
* report -> image: the positions are the report's tokens (merged into words for the map); the target is the
  drawn image's codes, all of them or those in a region, given the report (and its plan, for a run with one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from llm_cxr.errors import InputError
from llm_cxr.lm.prompts import image_prompt, plan_items, report_prompt
from llm_cxr.lm.sequence import Batch, ImageInputs, encode_prompt, image_prompt_ids

IMAGE_TO_REPORT = "image->report"
REPORT_TO_IMAGE = "report->image"
STOP_WORDS = frozenset("a an the of and or in on at is are was were be with without no not there to for as by this "
                       "that these those its it seen noted".split())


@dataclass
class Case:
    """One explanation problem. ``ids`` (1, T) with its ``image`` inputs; ``sources`` (S,) the positions attributed
    to; ``target`` (T-1,) 1.0 at the next-token positions whose log-probabilities make the fitting term."""

    direction: str
    ids: torch.Tensor
    image: ImageInputs | None
    sources: torch.Tensor
    target: torch.Tensor
    label: str
    grid: int = 0  # image -> report: the code grid's side
    words: list[str] = field(default_factory=list)  # report -> image: the report's words
    word_of: list[int] = field(default_factory=list)  # report -> image: the word of each source token (-1: none)
    # report -> image, guided: the stated list's tokens are sources too; each stated item's share goes to the
    # words of the report the labeler read it from (the list is made from them: requested_findings)
    item_of: list[int] = field(default_factory=list)  # per source token: its stated item (-1: a report token)
    evidence: list[list[int]] = field(default_factory=list)  # per stated item: its words in the report
    cut: bool = False  # report -> image: the report was cut to fit max_length with the image, as generation cuts it
    stated: list[str] | None = None  # the findings list of a guided prompt (the finding head's reading)
    response: str = ""  # image -> report: the report the target is part of
    span: tuple[int, int] | None = None  # image -> report: the target's characters in ``response`` (None: all)
    sections: str = "findings_impression"

    def batch(self, ids: torch.Tensor | None = None) -> Batch:
        ids = self.ids if ids is None else ids
        return Batch(ids, torch.ones_like(ids), self.image)


def sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of a report (section headers dropped), in order."""
    out = []
    for m in re.finditer(r"[^.!?\n]+[.!?]?", text):
        s, e = m.span()
        piece = m.group(0)
        head = re.match(r"\s*(FINDINGS|IMPRESSION)\s*:\s*", piece, re.I)
        if head:
            s += head.end()
        while s < e and text[s].isspace():
            s += 1
        if len(re.findall(r"[A-Za-z]{2,}", text[s:e])) >= 1:
            out.append((s, e))
    return out


def check_target(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise InputError("the target to explain is empty; give a phrase (e.g. 'small left pleural effusion')")
    words = re.findall(r"[A-Za-z]+", text.lower())
    if not words or all(w in STOP_WORDS for w in words):
        raise InputError(f"the target {text!r} has only stop words; name a finding (e.g. 'left pleural effusion')")
    return text


def _token_spans(tok, text: str) -> list[tuple[int, int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def image_to_report(model, codes: torch.Tensor, response: str, span: tuple[int, int] | None = None,
                    stated: list[str] | None = None, sections: str = "findings_impression") -> Case:
    """The prompt the report was written from (the image's codes (H*W,), and ``stated`` findings for a guided run),
    the ``response`` after it; the target is the response's tokens overlapping ``span`` (characters; None: all)."""
    tok, tmap = model.tok, model.map
    prompt, _ = encode_prompt(tok, tmap, report_prompt(model.template, None, sections, stated), codes.tolist())
    resp = tok(response, add_special_tokens=False)["input_ids"]
    if not resp:
        raise InputError("the report to explain is empty")
    offsets = _token_spans(tok, response)
    lo, hi = span if span is not None else (0, len(response))
    chosen = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
    if not chosen:
        raise InputError(f"the target span {response[lo:hi]!r} covers no token of the report")
    ids = torch.tensor([prompt + resp])
    target = torch.zeros(ids.shape[1] - 1)
    target[[len(prompt) + i - 1 for i in chosen]] = 1.0
    image = ImageInputs.of(ids, tmap, torch.tensor([len(prompt)]))
    sources = image.read[0].nonzero().squeeze(1)
    if len(sources) != tmap.tokens_per_image:
        raise InputError("the prompt holds no whole image to explain")
    return Case(IMAGE_TO_REPORT, ids, image, sources, target, response[lo:hi].strip(), grid=tmap.grid_size,
                stated=stated, response=response, span=span, sections=sections)


def with_codes(model, case: Case, codes: torch.Tensor, stated: list[str] | None) -> Case:
    """The same image -> report target on other codes (H*W,), with the prompt the pipeline would build for them
    (``stated``: what the run states for those codes)."""
    return image_to_report(model, codes, case.response, case.span, stated, case.sections)


def report_to_image(model, report: str, codes: torch.Tensor, stated: list[str] | None = None,
                    region: torch.Tensor | None = None, plan: torch.Tensor | None = None) -> Case:
    """The drawing prompt of ``report`` (with ``stated`` findings for a guided run) and the drawn image's codes
    (H*W,) as the response; the target is every code, or those where ``region`` (H*W,) bool is set."""
    tok, tmap = model.tok, model.map
    parts = image_prompt(model.template, report, None, stated)
    # a report too long for max_length with its image is cut as training and generation cut it: the words past the
    # cut were never read by the LM (their share is 0), but the stated list, read from the whole report, still names
    # what they say
    prompt, cut = image_prompt_ids(tok, tmap, model.template, parts, model.max_length)
    head = len(tok(parts[0], add_special_tokens=False)["input_ids"]) if parts[0] else 0
    offsets = _token_spans(tok, report)
    if cut:
        after = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in parts[2:] if isinstance(p, str) and p)
        offsets = offsets[:len(prompt) - head - after]
    ids = torch.tensor([prompt + [tmap.begin_id] + tmap.codes_to_ids(codes.reshape(-1)).tolist() + [tmap.end_id]])
    n_prompt = len(prompt)
    image = ImageInputs.of(ids, tmap, torch.tensor([n_prompt]), plan)
    hw = tmap.tokens_per_image
    keep = torch.ones(hw, dtype=torch.bool) if region is None else region.reshape(-1).bool()
    if not bool(keep.any()):
        raise InputError("the region to explain is empty")
    target = torch.zeros(ids.shape[1] - 1)
    target[n_prompt + torch.arange(hw)[keep]] = 1.0  # code k sits at n_prompt + 1 + k, predicted one before
    words, word_of = _words(report, offsets)
    sources = torch.arange(head, head + len(offsets))
    item_of, evidence = [-1] * len(offsets), []
    if stated:  # the guide line follows the report (image_prompt): its tokens are where the LM reads the list
        line = parts[2]
        line_offsets = _token_spans(tok, line)
        item_spans = _item_spans(line, stated)
        items = [next((k for k, (a, b) in enumerate(item_spans) if s < b and e > a), -1) for s, e in line_offsets]
        sources = torch.cat([sources, torch.arange(head + len(offsets), head + len(offsets) + len(line_offsets))])
        word_of, item_of = word_of + [-1] * len(line_offsets), item_of + items
        evidence = _evidence(report, stated)
    return Case(REPORT_TO_IMAGE, ids, image, sources, target, "the drawn image" if region is None else "the region",
                words=words, word_of=word_of, stated=stated, response=report, item_of=item_of, evidence=evidence,
                cut=cut)


def _item_spans(line: str, stated: list[str]) -> list[tuple[int, int]]:
    """Character spans of each stated item's phrase in the guide line (``_guide_line``: prefix, then the phrases
    joined by ", " and " and ")."""
    from llm_cxr.lm.prompts import _phrase

    out, at = [], 0
    for item in stated:
        phrase = _phrase(item)
        a = line.find(phrase, at)
        out.append((a, a + len(phrase)) if a >= 0 else (-1, -1))
        at = a + len(phrase) if a >= 0 else at
    return out


def _evidence(report: str, stated: list[str]) -> list[list[int]]:
    """Per stated item, the report's words that the labeler read it from: its positive mentions' phrases and, for
    an item with a side, that side's word in the same sentence."""
    from llm_cxr.data.labeler import label_report
    from llm_cxr.lm.prompts import split_item

    spans = [m.span() for m in re.finditer(r"\S+", report)]
    located, cursor, last = [], 0, None  # mentions come sentence by sentence: a repeated sentence is found again
    for m in label_report(report).mentions:
        if m.sentence != last:
            start = report.find(m.sentence, cursor)
            cursor, last = (start + len(m.sentence), m.sentence) if start >= 0 else (cursor, None)
        if start >= 0 and m.status == 1:
            located.append((m, start))
    out = []
    for item in stated:
        name, side = split_item(item)
        chars: list[tuple[int, int]] = []
        for m, start in (x for x in located if x[0].label == name):
            chars.append((start + m.span[0], start + m.span[1]))
            if side:
                chars += [(start + x.start(), start + x.end())
                          for x in re.finditer(rf"\b{side}\b", m.sentence, re.IGNORECASE)]
        out.append(sorted({i for i, (s, e) in enumerate(spans) for a, b in chars if s < b and e > a}))
    return out


def _words(text: str, offsets: list[tuple[int, int]]) -> tuple[list[str], list[int]]:
    """Merge sub-word tokens into the words they belong to: (words, index of the word of each token)."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    words = [text[a:b] for a, b in spans]
    word_of = []
    for a, b in offsets:
        mid = next((i for i, (s, e) in enumerate(spans) if s < max(b, a + 1) and e > a), None)
        word_of.append(mid if mid is not None else (word_of[-1] if word_of else 0))
    return words, word_of


def stated_for_drawing(model, report: str) -> list[str] | None:
    """What a drawing prompt of ``report`` states, as generation makes it: the findings the report asks for (with
    sides if the run was trained with them) for a guided run, else None."""
    from llm_cxr.lm.prompts import requested_findings, split_item

    if not model.guided_images:
        return None
    stated = requested_findings(report)
    return stated if model.guide_sides else [split_item(i)[0] for i in stated]


def plan_for(model, report: str, stated: list[str] | None) -> torch.Tensor | None:
    """The image plan's input for a drawing of ``report`` (None when the run has no plan or draws unguided)."""
    from llm_cxr.lm.addons.positions import find

    positions = find(model.model)
    if positions is None or positions.plan is None or stated is None:
        return None
    return positions.plan.vector([plan_items(stated, report)])


__all__ = ["IMAGE_TO_REPORT", "REPORT_TO_IMAGE", "Case", "check_target", "image_to_report", "plan_for",
           "report_to_image", "sentences", "with_codes"]
