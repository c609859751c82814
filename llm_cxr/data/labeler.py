"""Rule-based CheXpert-style labels from radiology report text.

The method is the one of the CheXpert labeler (Irvin et al., "CheXpert: A Large Chest
Radiograph Dataset with Uncertainty Labels and Expert Comparison", AAAI 2019) and NegBio
(Peng et al., "NegBio: a high-performance tool for negation and uncertainty detection in
radiology reports", AMIA 2018 Informatics Summit), without a parser:

1. *Mention extraction*: phrases naming an observation (``pleural effusion``, ``PICC``) and
   structures whose state is described (``heart size is normal``), from
   :mod:`llm_cxr.data.labeler_rules`.
2. *Classification* of each mention from cues in its sentence: a hedged negation
   ("cannot be excluded") makes it uncertain; otherwise the nearest cue before it inside its
   clause decides (``no``, ``without`` reach across a comma-separated list; a clause ends at
   "but", "however", ";", ", there is", ...); then a cue after it ("is not seen",
   "has resolved", "may be present") up to the next comma, or over a whole coordinated list
   ("consolidation, effusion and pneumothorax are not seen"). A doubt word inside a
   negation's reach ("no opacity to suggest pneumonia") negates.
3. *Aggregation* per label: positive if any mention is positive, else uncertain if any is
   uncertain, else negative if any is negative, else not mentioned. ``no_finding`` is
   positive when no pathology (every class except support devices) is positive or
   uncertain, as in CheXpert.

Laterality, location and severity words are attached to the nearest mention in their
clause. Everything is precompiled regular expressions over lower-cased text, deterministic,
and fast enough for thousands of reports per second.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Iterable

from llm_cxr.data import labeler_patterns as P
from llm_cxr.data import labeler_rules as R
from llm_cxr.data.labeler_rules import LabelAgreement, compare_labels, iu_reference_labels
from llm_cxr.data.reports import parse_sections
from llm_cxr.data.schema import (
    DEVICES,
    FINDING_NAMES,
    LABEL_NAMES,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    Finding,
)

log = logging.getLogger(__name__)

# Classes whose positive/uncertain status rules out "No Finding" (CheXpert: all but devices).
PATHOLOGY_LABELS: tuple[str, ...] = tuple(
    n for n in LABEL_NAMES if n not in ("no_finding", "support_devices") and n not in DEVICES
)


@dataclass
class Mention:
    """One piece of evidence: a phrase, the label it speaks about and its status."""

    label: str
    status: int  # 1 positive, 0 negative, -1 uncertain
    phrase: str  # the matched words, as written
    sentence: str  # the sentence it was found in, as written
    span: tuple[int, int]  # character offsets of ``phrase`` in ``sentence``
    cue: str | None = None  # the negation / uncertainty / state words that decided the status

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "status": self.status,
            "phrase": self.phrase,
            "sentence": self.sentence,
            "span": list(self.span),
            "cue": self.cue,
        }


@dataclass
class LabelResult:
    """Labels of one report, the structured findings, and the evidence behind them."""

    labels: dict[str, int | None]
    findings: list[Finding] = field(default_factory=list)
    mentions: list[Mention] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": dict(self.labels),
            "findings": [f.to_dict() for f in self.findings],
            "mentions": [m.to_dict() for m in self.mentions],
        }

    def binary(self, uncertain_as: int = 1) -> dict[str, int]:
        """0/1 labels: not mentioned -> 0, uncertain -> ``uncertain_as``."""
        if uncertain_as not in (0, 1, UNCERTAIN):
            raise ValueError(f"uncertain_as must be 0, 1 or -1, got {uncertain_as!r}")
        return {k: 0 if v is None else (uncertain_as if v == UNCERTAIN else v)
                for k, v in self.labels.items()}

    def positive_findings(self) -> set[str]:
        """Names among :data:`FINDING_NAMES` labelled positive."""
        return {n for n in FINDING_NAMES if self.labels.get(n) == POSITIVE}


# ---------------------------------------------------------------------------------------
# Text preparation


def _report_body(text: str) -> str:
    """Findings + impression when the report has those headers, else the whole text."""
    sections = parse_sections(text)
    if not sections.empty:
        return f"{sections.findings}\n{sections.impression}".strip()
    return sections.other


def _sentences(body: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence; a question mark stays in its sentence (a cue)."""
    spans, start = [], 0
    for m in P.SENTENCE_END.finditer(body):
        end = m.end() if m.group().startswith(("?", "!")) else m.start()
        if body[start:end].strip():
            spans.append((start, end))
        start = m.end()
    if body[start:].strip():
        spans.append((start, len(body)))
    return spans


# ---------------------------------------------------------------------------------------
# Classification


@dataclass
class _Cue:
    start: int
    end: int
    kind: str  # "neg" | "unc" | "hedge" | "affirm"
    text: str
    lists: bool = False  # a negation that reaches across commas


def _spans(pattern: re.Pattern[str], low: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in pattern.finditer(low)]


class _Sentence:
    """Cues and clause breaks of one lower-cased sentence, found once and reused."""

    def __init__(self, low: str) -> None:
        self.low = low
        hedges, pseudo = _spans(P.HEDGE_PRE, low), _spans(P.PSEUDO, low)
        neg_post = _spans(P.NEG_POST, low)

        def free(s: int, e: int) -> bool:
            # A pre cue inside a longer cue ("not" in "cannot exclude", "is not seen") is not
            # one; a post cue starting with the same word ("resolved") leaves it be.
            return not any(a < e and s < b for a, b, _ in hedges + pseudo) and not any(
                a < s < b for a, b, _ in neg_post)

        pre = [_Cue(s, e, "hedge", t) for s, e, t in hedges]
        pre += [_Cue(s, e, "affirm", t) for s, e, t in pseudo]
        pre += [_Cue(s, e, "neg", t, bool(P.LIST_NEGATION.fullmatch(t)))
                for s, e, t in _spans(P.NEG_PRE, low) if free(s, e)]
        pre += [_Cue(s, e, "unc", t) for s, e, t in _spans(P.UNC_PRE, low) if free(s, e)]
        self.pre = sorted(pre, key=lambda c: c.end)
        self.pre_ends = [c.end for c in self.pre]
        post = [_Cue(s, e, "hedge", t) for s, e, t in _spans(P.HEDGE_POST, low)]
        post += [_Cue(s, e, "neg", t) for s, e, t in neg_post]
        post += [_Cue(s, e, "unc", t) for s, e, t in _spans(P.UNC_POST, low)]
        self.post = sorted(post, key=lambda c: c.start)
        self.post_starts = [c.start for c in self.post]
        self.breaks = [(m.start(), m.end()) for m in P.SCOPE_END.finditer(low)]
        self.soft_breaks = [m.end() for m in P.NEGATION_END.finditer(low)]
        self.commas = [m.start() for m in P.COMMA.finditer(low)]

    def clause(self, start: int, end: int, commas: bool = False) -> tuple[int, int]:
        """The clause around ``[start, end)``: between the scope breaks (and commas) around it."""
        lo, hi = 0, len(self.low)
        for s, e in self.breaks:
            if e <= start:
                lo = max(lo, e)
            elif s >= end:
                hi = min(hi, s)
                break
        if commas:
            i = bisect_left(self.commas, start)
            if i > 0:
                lo = max(lo, self.commas[i - 1] + 1)
            j = bisect_left(self.commas, end)
            if j < len(self.commas):
                hi = min(hi, self.commas[j])
        return lo, hi

    def _comma_between(self, a: int, b: int) -> bool:
        i = bisect_left(self.commas, a)
        return i < len(self.commas) and self.commas[i] < b

    def _pre_cue(self, start: int, lo: int) -> _Cue | None:
        """The nearest cue before ``start`` in the clause whose reach covers ``start``."""
        soft = max((b for b in self.soft_breaks if b <= start), default=lo)
        for idx in range(bisect_right(self.pre_ends, start) - 1, -1, -1):
            cue = self.pre[idx]
            if cue.start < lo:
                return None
            if cue.kind != "unc" and cue.start < soft:
                continue  # "no X, consistent with Y": only doubt reaches past "consistent with"
            if cue.kind == "neg" and not cue.lists and self._comma_between(cue.end, start):
                continue  # a bare "not" does not reach past a comma
            return cue
        return None

    def _post_cue(self, end: int, hi: int) -> _Cue | None:
        idx = bisect_left(self.post_starts, end)
        if idx < len(self.post) and self.post[idx].start < hi:
            return self.post[idx]
        return None

    def status(self, start: int, end: int) -> tuple[int, _Cue | None]:
        """Status of a mention at ``[start, end)`` from the cues around it, and the cue."""
        lo, _ = self.clause(start, end)
        pre = self._pre_cue(start, lo)
        post = self._post_cue(end, self.clause(start, end, commas=True)[1])
        cues = [c for c in (pre, post) if c is not None]
        for kind, status in (("hedge", UNCERTAIN), ("neg", NEGATIVE)):
            for cue in cues:
                if cue.kind == kind:
                    return status, cue
        for cue in cues:
            if cue.kind == "unc":
                if cue is pre and self._negated_doubt(cue, lo):
                    return NEGATIVE, cue  # "no opacity to suggest pneumonia"
                return UNCERTAIN, cue
        return POSITIVE, None

    def _negated_doubt(self, unc: _Cue, lo: int) -> bool:
        """A doubt cue inside a negation's reach (no comma between) is part of the negation."""
        for cue in self.pre:
            if cue.end > unc.start:
                break
            if cue.start < lo or cue.kind != "neg":
                continue
            if not self._comma_between(cue.end, unc.start):
                return True
        return False


def _attribute_state(sent: _Sentence, rule_idx: int, start: int, end: int
                     ) -> tuple[int, str] | None:
    """The state the sentence gives the structure at ``[start, end)``, if it gives one."""
    states = P.STATES[rule_idx]
    lo, hi = sent.clause(start, end)
    m = states.search(sent.low, end, min(hi, end + P.STATE_WINDOW_AFTER))
    if m is None:  # "normal heart size": the last state word just before the structure
        for m in states.finditer(sent.low, max(lo, start - P.STATE_WINDOW_BEFORE), start):
            pass
    if m is None:
        return None
    return P.STATE_STATUS[m.lastgroup], m.group()


# ---------------------------------------------------------------------------------------
# Mentions of one sentence


@dataclass
class _Item:
    """A matched phrase with its status and the attribute words attached to it."""

    start: int
    end: int
    labels: tuple[str, ...]
    capped: tuple[str, ...]
    status: int
    cue: _Cue | str | None  # the cue that decided the status, or the state words
    attached: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def cue_text(self) -> str | None:
        return self.cue.text if isinstance(self.cue, _Cue) else self.cue

    def decided_after(self) -> bool:
        """Whether a cue after the phrase ("... are not seen") decided its status."""
        return isinstance(self.cue, _Cue) and self.cue.start >= self.end


def _classify(ctx: _Sentence, m: re.Match[str]) -> _Item | None:
    kind, idx = m.lastgroup[0], int(m.lastgroup[1:])
    if kind == "m":
        rule = R.MENTION_RULES[idx]
        status, cue = ctx.status(m.start(), m.end())
        return _Item(m.start(), m.end(), rule.labels, (), status, cue)
    attr = R.ATTRIBUTE_RULES[idx]
    state = _attribute_state(ctx, idx, m.start(), m.end())
    if state is None:
        return None  # "the heart" with nothing said about it
    status, words = state
    item = _Item(m.start(), m.end(), attr.labels, attr.capped, status, words)
    if status != NEGATIVE:
        context, cue = ctx.status(m.start(), m.end())
        if context != POSITIVE:  # "no evidence of heart enlargement", "possibly enlarged heart"
            item.status, item.cue = context, cue
    return item


def _spread_over_lists(low: str, items: list[_Item]) -> None:
    """``A, B and C are not seen``: a cue after a coordinated list decides every item in it."""
    for i in range(len(items) - 1, 0, -1):
        last = items[i]
        if last.status == POSITIVE or not last.decided_after():
            continue
        chain, conjunction = [], False
        for j in range(i - 1, -1, -1):
            gap = P.LIST_GAP.fullmatch(low, items[j].end, items[j + 1].start)
            if gap is None or items[j].cue not in (None, last.cue):
                break
            conjunction = conjunction or gap.group("conj") is not None
            chain.append(items[j])
        if conjunction:  # "effusion, pneumothorax has resolved" is no list
            for it in chain:
                it.status, it.cue = last.status, last.cue


def _attach(ctx: _Sentence, items: list[_Item], key: str,
            cues: Iterable[tuple[int, int, Any]]) -> None:
    """Give each cue word to the nearest mention in its clause (ties go to the one after)."""
    limit = P.ATTACH_MAX[key]
    for s, e, value in cues:
        lo, hi = ctx.clause(s, e)
        best, best_d = None, limit + 1
        for it in items:
            if it.start < lo or it.end > hi:
                continue
            if it.start >= e:
                d = it.start - e
            elif it.end <= s:
                d = s - it.end + 0.5  # prefer the mention the word precedes
            else:
                d = 0
            if d < best_d:
                best, best_d = it, d
        if best is not None:
            best.attached.setdefault(key, []).append(value)


def _cue_words(cues: tuple[re.Pattern[str], list[str]], low: str
               ) -> Iterable[tuple[int, int, str]]:
    pattern, values = cues
    for m in pattern.finditer(low):
        value = values[int(m.lastgroup[1:])]
        yield m.start(), m.end(), value.format(**{k: v for k, v in m.groupdict().items() if v})


def _sentence_items(low: str) -> list[_Item]:
    matches = list(P.MENTIONS.finditer(low))
    if not matches:
        return []
    ctx = _Sentence(low)
    items = [it for it in (_classify(ctx, m) for m in matches) if it is not None]
    if not items:
        return items
    _spread_over_lists(low, items)
    _attach(ctx, items, "laterality", _cue_words(P.LATERALITY, low))
    _attach(ctx, items, "location", _cue_words(P.LOCATION, low))
    _attach(ctx, items, "severity", _cue_words(P.SEVERITY, low))
    sized = [it for it in items if {"nodule", "mass"} & set(it.labels)]
    if sized:
        _attach(ctx, sized, "size", ((m.start(), m.end(), _to_mm(m)) for m in P.SIZE.finditer(low)))
    return items


def _to_mm(m: re.Match[str]) -> float:
    value = float(m.group("num"))
    return value * 10.0 if m.group("unit") == "cm" else value


# ---------------------------------------------------------------------------------------
# Aggregation


def _aggregate(statuses: list[int]) -> int | None:
    if not statuses:
        return None
    if POSITIVE in statuses:
        return POSITIVE
    if UNCERTAIN in statuses:
        return UNCERTAIN
    return NEGATIVE


def _laterality(sides: list[str]) -> str | None:
    found = set(sides)
    if not found:
        return None
    if "bilateral" in found or {"left", "right"} <= found:
        return "bilateral"
    return found.pop()


def _finding(name: str, status: int, items: list[_Item]) -> Finding:
    """The structured finding from the mentions that decided its status."""
    got: dict[str, list[Any]] = {"laterality": [], "location": [], "severity": [], "size": []}
    for it in items:
        for key, values in it.attached.items():
            got[key] += values
    return Finding(
        name=name,
        laterality=_laterality(got["laterality"]),
        location=got["location"][0] if got["location"] else None,
        severity=got["severity"][0] if got["severity"] else None,
        size_mm=got["size"][0] if got["size"] else None,
        extra={"uncertain": True} if status == UNCERTAIN else {},
    )


# ---------------------------------------------------------------------------------------
# Public API


def label_report(text: str) -> LabelResult:
    """Labels for every name in :data:`LABEL_NAMES` (1, 0, -1 or None), findings, evidence.

    ``text`` is a report, with or without ``FINDINGS:`` / ``IMPRESSION:`` headers (when it
    has them, only those two sections are read: an indication such as "rule out pneumonia"
    is not a finding). De-identification placeholders (``XXXX``) are treated as unknown
    words. A text with nothing to read gives every label ``None``. Findings are those of
    :data:`FINDING_NAMES` labelled positive or uncertain (``extra["uncertain"]``).
    """
    if not isinstance(text, str):
        raise TypeError(f"label_report expects a str, got {type(text).__name__}")
    body = _report_body(text)
    low = body.lower()
    if len(low) != len(body):  # a few Unicode letters change length when lower-cased
        body = low
    if not P.HAS_WORD.search(P.ANONYMISED.sub(" ", low)):
        return LabelResult(labels={name: None for name in LABEL_NAMES})
    by_label: dict[str, list[tuple[int, _Item]]] = {}
    mentions: list[Mention] = []
    for s, e in _sentences(body):
        lead = len(body[s:e]) - len(body[s:e].lstrip())  # spans refer to the stripped sentence
        sentence = body[s:e].strip()
        for it in _sentence_items(low[s:e]):
            for label in it.labels:
                status = UNCERTAIN if label in it.capped and it.status == POSITIVE else it.status
                by_label.setdefault(label, []).append((status, it))
                a, b = it.start - lead, it.end - lead
                mentions.append(Mention(label, status, sentence[a:b], sentence, (a, b), it.cue_text))
    labels = {name: _aggregate([st for st, _ in by_label.get(name, [])]) for name in LABEL_NAMES}
    sick = any(labels[n] in (POSITIVE, UNCERTAIN) for n in PATHOLOGY_LABELS)
    labels["no_finding"] = NEGATIVE if sick else POSITIVE
    findings = [
        _finding(name, labels[name], [it for st, it in by_label[name] if st == labels[name]])
        for name in FINDING_NAMES if labels[name] in (POSITIVE, UNCERTAIN)
    ]
    return LabelResult(labels=labels, findings=findings, mentions=mentions)


def label_reports(texts: Iterable[str], progress: bool = False) -> list[LabelResult]:
    """:func:`label_report` for each text, in order."""
    from tqdm.auto import tqdm

    results = [label_report(t) for t in tqdm(texts, desc="labelling", disable=not progress)]
    log.debug("labelled %d reports", len(results))
    return results


def dataset_labels(text: str) -> tuple[dict[str, int], list[Finding]]:
    """Labels and findings in the dataset schema, for importers of real reports.

    Labels: 1 positive, 0 negative or not mentioned, -1 uncertain (the ``labels`` column).
    Findings: positive and uncertain findings; uncertain ones carry ``extra["uncertain"]``.
    """
    result = label_report(text)
    return result.binary(uncertain_as=UNCERTAIN), result.findings


__all__ = [
    "LabelAgreement",
    "LabelResult",
    "Mention",
    "PATHOLOGY_LABELS",
    "compare_labels",
    "dataset_labels",
    "iu_reference_labels",
    "label_report",
    "label_reports",
]
