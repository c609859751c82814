"""Reading the reports of any system and the references they are scored against, matched by study id.

Predictions: a JSONL file (one object per line) or a CSV file with a header, each row an ``id`` and a
report text in the first of the columns ``report``, ``prediction``, ``generated``, ``text`` that the
file has (or the one named). References: the same, or an llm-cxr dataset folder (its ``report``
column, one split). Nothing in a file stops the others: unreadable lines, rows without an id,
duplicated ids and empty reports are counted and listed in :class:`Problems`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm_cxr.errors import InputError

TEXT_FIELDS = ("report", "prediction", "generated", "text", "reference")
SECTIONS = ("all", "findings", "impression")
_HEADER = re.compile(r"\b(findings|impression)\s*:", re.IGNORECASE)


@dataclass
class Problems:
    """What could not be scored as given, per file; listed in the results, never fatal on its own."""

    unreadable: list[str] = field(default_factory=list)  # "file:line: why"
    no_id: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # ids seen twice (the first is kept)
    empty: list[str] = field(default_factory=list)  # ids whose prediction is empty (scored as an empty report)
    missing: list[str] = field(default_factory=list)  # reference ids with no prediction
    unknown: list[str] = field(default_factory=list)  # predicted ids with no reference

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.__dict__.items()}

    def to_dict(self, limit: int = 50) -> dict:
        return {k: {"count": len(v), "examples": v[:limit]} for k, v in self.__dict__.items()}

    def lines(self) -> list[str]:
        return [f"{len(v)} {k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}"
                for k, v in self.__dict__.items() if v]


def section_text(text: str, section: str = "all") -> str:
    """One section of a report (``FINDINGS:`` / ``IMPRESSION:``), or all of it without the headers.

    A report without headers is all findings-and-impression text: every section choice returns it
    whole, so plain one-paragraph outputs of other systems are scored, not emptied."""
    if section not in SECTIONS:
        raise InputError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    text = text or ""
    parts = _HEADER.split(text)
    if len(parts) == 1 or section == "all":
        return " ".join(p.strip() for i, p in enumerate(parts) if i % 2 == 0).strip()
    got = [parts[i + 1].strip() for i in range(1, len(parts) - 1, 2) if parts[i].lower() == section]
    return " ".join(got).strip()


def _rows(path: Path, problems: Problems):
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f), start=2):
                    yield i, row
        except (UnicodeDecodeError, csv.Error) as e:
            problems.unreadable.append(f"{path}: {e} (rows after this point not read)")
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.unreadable.append(f"{path}:{i}: {type(e).__name__}: {e}")
                continue
            if not isinstance(row, dict):
                problems.unreadable.append(f"{path}:{i}: a JSON {type(row).__name__}, not an object")
                continue
            yield i, row


def read_reports(path: str | Path, text_field: str | None = None, problems: Problems | None = None
                 ) -> dict[str, str]:
    """``{id: report}`` from a JSONL or CSV file (first occurrence of an id kept)."""
    path = Path(path)
    problems = problems if problems is not None else Problems()
    if not path.is_file():
        raise InputError(f"{path}: not a file (expected JSONL or CSV with an id and a report per row)")
    out: dict[str, str] = {}
    chosen = text_field
    for line, row in _rows(path, problems):
        if chosen is None:
            chosen = next((f for f in TEXT_FIELDS if f in row), None)
            if chosen is None:
                raise InputError(f"{path}:{line}: no report column; expected one of {', '.join(TEXT_FIELDS)} "
                                 f"(or name it with --field), found {', '.join(map(str, row))}")
        rid = row.get("id")
        if rid in (None, ""):
            problems.no_id.append(f"{path}:{line}")
            continue
        rid = str(rid)
        if rid in out:
            problems.duplicates.append(rid)
            continue
        text = row.get(chosen)
        out[rid] = "" if text is None else str(text)
    return out


def read_references(path: str | Path, split: str | None = "test", text_field: str | None = None,
                    problems: Problems | None = None) -> dict[str, str]:
    """References from a dataset folder (its ``report`` column, ``split`` only) or a JSONL/CSV file."""
    path = Path(path)
    if path.is_dir():
        from llm_cxr.data.dataset import load_dataset

        ds = load_dataset(path, split=split).select_columns(["id", "report"])
        return dict(zip(map(str, ds["id"]), ds["report"]))
    return read_reports(path, text_field, problems)


def match(predictions: dict[str, str], references: dict[str, str], problems: Problems) -> list[str]:
    """Ids scored: those with both a prediction and a reference, in the references' order."""
    problems.missing.extend(i for i in references if i not in predictions)
    problems.unknown.extend(i for i in predictions if i not in references)
    ids = [i for i in references if i in predictions]
    problems.empty.extend(i for i in ids if not predictions[i].strip())
    return ids
