"""Radiology report sections: parse ``FINDINGS:`` / ``IMPRESSION:`` and write them back.

Real reports (MIMIC-CXR, IU X-ray) carry more headers (INDICATION, COMPARISON,
TECHNIQUE, EXAMINATION, ...) in upper case followed by a colon; MIMIC also uses
``FINAL REPORT`` and underscores for de-identified text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A header is an upper-case phrase at the start of a line (or of the text) ending in ':'.
_HEADER = re.compile(r"(?:^|\n)[ \t]*([A-Z][A-Z /&()-]{2,40}):", re.MULTILINE)

_ALIASES = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
}


@dataclass
class ReportSections:
    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    other: str = ""

    @property
    def empty(self) -> bool:
        return not (self.findings or self.impression)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_sections(text: str) -> ReportSections:
    """Split a report into its sections. Text before any header goes to ``other``."""
    out = ReportSections()
    if not text:
        return out
    matches = list(_HEADER.finditer(text))
    if not matches:
        out.other = _clean(text)
        return out
    pre = text[: matches[0].start()]
    chunks: dict[str, list[str]] = {"other": [pre]}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        key = _ALIASES.get(m.group(1).strip().upper(), "other")
        chunks.setdefault(key, []).append(text[m.end() : end])
    for key, parts in chunks.items():
        setattr(out, key, _clean(" ".join(parts)))
    return out


def format_report(findings: str, impression: str) -> str:
    """The canonical llm-cxr report text: two sections, one per line."""
    parts = []
    if findings.strip():
        parts.append(f"FINDINGS: {_clean(findings)}")
    if impression.strip():
        parts.append(f"IMPRESSION: {_clean(impression)}")
    return "\n".join(parts)
