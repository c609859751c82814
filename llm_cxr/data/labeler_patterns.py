"""The report labeler's rules (:mod:`llm_cxr.data.labeler_rules`) compiled to regular expressions, once, at
import: the tables :mod:`llm_cxr.data.labeler` matches report text against."""

from __future__ import annotations

import re

from llm_cxr.data import labeler_rules as R
from llm_cxr.data.schema import NEGATIVE, POSITIVE, UNCERTAIN


def _compile_mentions() -> re.Pattern[str]:
    parts = [f"(?P<m{i}>{r.pattern})" for i, r in enumerate(R.MENTION_RULES)]
    parts += [f"(?P<a{i}>{r.subject})" for i, r in enumerate(R.ATTRIBUTE_RULES)]
    # Mentions start at a word boundary; saying so up front lets the engine skip
    # mid-word positions cheaply (about 2.5x faster).
    return re.compile(r"\b(?:" + "|".join(parts) + ")")


def _compile_states(rule: R.AttributeRule) -> re.Pattern[str]:
    # Borderline and normal first: at one position "not enlarged" / "borderline enlarged"
    # must win over "enlarged".
    parts = []
    for name, pat in (("unc", rule.borderline), ("neg", rule.normal), ("pos", rule.abnormal)):
        if pat:
            parts.append(f"(?P<{name}>{pat})")
    return re.compile("|".join(parts))


MENTIONS = _compile_mentions()
STATES = [_compile_states(r) for r in R.ATTRIBUTE_RULES]
STATE_STATUS = {"pos": POSITIVE, "neg": NEGATIVE, "unc": UNCERTAIN}
# Cues made of words start at a word boundary (see _compile_mentions).
HEDGE_PRE = re.compile(rf"\b(?:{R.HEDGE_PRE})")
HEDGE_POST = re.compile(rf"\b(?:{R.HEDGE_POST})")
PSEUDO = re.compile(rf"\b(?:{R.PSEUDO_NEGATION})")
NEG_PRE = re.compile(rf"\b(?:{R.NEGATION_PRE})")
NEG_POST = re.compile(rf"\b(?:{R.NEGATION_POST})")
UNC_PRE = re.compile(rf"\b(?:{R.UNCERTAINTY_PRE})")
UNC_POST = re.compile(R.UNCERTAINTY_POST)
SCOPE_END = re.compile(R.SCOPE_END)
NEGATION_END = re.compile(R.NEGATION_END)
COMMA = re.compile(r",")
# What may stand between two items of a list: a comma and/or a conjunction, and up to two
# modifiers ("consolidation, large pleural effusion or pneumothorax").
LIST_GAP = re.compile(
    r"\s*(?:,\s*)?(?:(?P<conj>and|or|nor|as well as)\s+)?"
    r"(?:(?!(?:is|are|was|were|has|have|had|with|without|no|not|there|the)\b)[a-z-]+\s+){0,2}"
)
# Negations that reach across a comma-separated list ("no A, B, or C"); others stop at a comma.
LIST_NEGATION = re.compile(r"no|without|negative for|free of|clear of|absence of|nor")


def _compile_cues(cues: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str], list[str]]:
    """One regex for a family of attribute words; group ``c<i>`` gives value ``i``."""
    return re.compile(r"\b(?:" + "|".join(f"(?P<c{i}>{p})" for i, (p, _) in enumerate(cues)) + ")"), [
        v for _, v in cues]


LATERALITY = _compile_cues(R.LATERALITY_CUES)
LOCATION = _compile_cues(R.LOCATION_CUES)
SEVERITY = _compile_cues(R.SEVERITY_CUES)
SIZE = re.compile(R.SIZE_CUE)
# Sentence ends: . ? ! before white space or the end, a full stop glued to a capital, newlines.
SENTENCE_END = re.compile(r"[.?!]+(?=\s|$)|\.(?=[A-Z][a-z])|\n+")
ANONYMISED = re.compile(r"\bX{3,}\b", re.IGNORECASE)
HAS_WORD = re.compile(r"[a-z]{2,}")
STATE_WINDOW_AFTER = 70  # characters after a structure in which its state is looked for
STATE_WINDOW_BEFORE = 30  # ... and before it ("normal heart size")
ATTACH_MAX = {"laterality": 60, "location": 60, "severity": 30, "size": 40}
