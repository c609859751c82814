"""What every importer shares: options, reading CSV tables, labelling, building schema rows.

Importers stream rows into :func:`llm_cxr.data.dataset.write_dataset`: each image is
read, converted to 8-bit grey at the model size and encoded as PNG only when its row is
written, so memory stays flat however large the source dataset is. A bad item (missing
or corrupt image, report without usable text) is recorded in the job's
:class:`~llm_cxr.data.dataset.BadItemLog` and skipped; the good ones are kept.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image
from tqdm.auto import tqdm

from llm_cxr.data.dataset import BadItemLog, WriteJob
from llm_cxr.data.images import load_image, png_bytes
from llm_cxr.data.reports import format_report, parse_sections
from llm_cxr.data.schema import LABEL_NAMES, Finding, empty_labels, findings_to_json
from llm_cxr.errors import ConfigError, DatasetError, ImageReadError

log = logging.getLogger(__name__)

LabelFn = Callable[[str], "tuple[dict[str, int], list[Finding]]"]
"""A report labeler: report text -> (labels in schema format, findings)."""


@dataclass
class ImportOptions:
    """Options every importer takes (the CLI's ``--out --size --seed --limit --no-label``)."""

    out: Path
    size: int = 512
    seed: int = 0
    limit: int | None = None
    label: LabelFn | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.out is None or str(self.out) == "":
            raise ConfigError("an output dataset folder is required (--out)")
        self.out = Path(self.out).expanduser()
        if not isinstance(self.size, int) or self.size < 0:
            raise ConfigError(f"image size must be an integer >= 0 (0 keeps the original size), got {self.size!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"limit must be a positive number of images or None, got {self.limit!r}")
        if self.label is True:
            raise ConfigError("label=True: pass the labeler function itself, e.g. "
                              "label=llm_cxr.data.labeler.dataset_labels (or your own function)")
        if not (self.label in (None, False) or callable(self.label)):
            raise ConfigError(f"label must be None or a labeler function, got {self.label!r}")


# ---- files and tables --------------------------------------------------------------------

def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist; check the path")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder")
    return path


def find_table(root: Path, stem: str, required: bool = True) -> Path | None:
    """``ROOT/STEM.csv`` or ``ROOT/STEM.csv.gz`` (PhysioNet ships the gzipped form)."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    if required:
        raise DatasetError(f"{root} has no {stem}.csv or {stem}.csv.gz; download it with the images "
                           "(see data/README.md)")
    return None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_csv(path: Path, columns: Sequence[str], optional: Sequence[str] = (),
             delimiter: str = ",", all_columns: bool = False, hint: str = "") -> Iterator[dict[str, str]]:
    """Stream rows of a CSV (``.gz`` too) as dicts of ``columns`` (+ ``optional`` where present,
    or every column with ``all_columns``).

    Raises :class:`DatasetError` naming the file, the missing columns and the columns found,
    before the first row, when a required column is absent.
    """
    start = 1  # the line the row being read starts on
    try:
        with _open_text(path) as f:
            # strict: an unterminated quote is an error, not the rest of the file read as one field (which would
            # silently merge every following row into one report)
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path} is empty; expected a header with columns {list(columns)}")
            header = [h.strip() for h in header]
            check_columns(path, header, columns, hint)
            keep = header if all_columns else [c for c in (*columns, *optional) if c in header]
            idx = [header.index(c) for c in keep]
            start = reader.line_num + 1
            for values in reader:
                if values:
                    yield {c: (values[i].strip() if i < len(values) else "") for c, i in zip(keep, idx)}
                start = reader.line_num + 1
    except csv.Error as e:
        raise DatasetError(f"{path}: the row starting on line {start} is malformed ({e}); a quote opened there is "
                           f"probably never closed. Rows before it were read; fix the file and import again") from e
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DatasetError(f"cannot read {path} as CSV ({type(e).__name__}: {e})") from e


def check_columns(path: Path, found: Iterable[str], required: Sequence[str], hint: str = "") -> None:
    found = list(found)
    missing = [c for c in required if c not in found]
    if missing:
        raise DatasetError(f"{path} has no column(s) {missing}; columns found: {found}. "
                           + (hint or "Check that this is the right file (see data/README.md)"))


# ---- reports and labels ------------------------------------------------------------------

def sectioned_report(text: str) -> tuple[str, dict[str, str]] | None:
    """Canonical ``FINDINGS:``/``IMPRESSION:`` text of a report, plus its other sections.

    Returns None if the report has neither a findings nor an impression section.
    """
    sec = parse_sections(text)
    if sec.empty:
        return None
    extra = {k: v for k, v in (("indication", sec.indication), ("comparison", sec.comparison)) if v}
    return format_report(sec.findings, sec.impression), extra


def has_section_headers(text: str) -> bool:
    """True if the text has any header ``parse_sections`` recognises (FINDINGS, INDICATION, ...)."""
    sec = parse_sections(text)
    return sec.other != " ".join(text.split()) or not sec.empty


class Labeler:
    """Labels and findings for a report: the rule-based labeler, or empty when labelling is off.

    Keeps the last result, since consecutive images of one study share their report.
    """

    def __init__(self, label: LabelFn | None) -> None:
        self.fn: LabelFn | None = label if callable(label) else None
        self._last: tuple[str, tuple[dict[str, int], list[Finding]]] | None = None

    @property
    def name(self) -> str:
        return "labeler" if self.fn is not None else "none"

    def __call__(self, report: str) -> tuple[dict[str, int], list[Finding]]:
        if self.fn is None or not report.strip():
            return empty_labels(), []
        if self._last is None or self._last[0] != report:
            labels, findings = self.fn(report)
            self._last = (report, (check_labels(labels), list(findings)))
        labels, findings = self._last[1]
        return dict(labels), list(findings)


def check_labels(labels: dict[str, int]) -> dict[str, int]:
    """Labels in schema form: every name in LABEL_NAMES, values -1/0/1, nothing else."""
    unknown = set(labels) - set(LABEL_NAMES)
    if unknown:
        raise DatasetError(f"labeler returned unknown label names {sorted(unknown)}; known: {LABEL_NAMES}")
    out = empty_labels()
    for k, v in labels.items():
        if v not in (-1, 0, 1):
            raise DatasetError(f"label {k!r} must be -1, 0 or 1, got {v!r}")
        out[k] = int(v)
    return out


# ---- rows --------------------------------------------------------------------------------

def load_or_skip(path: Path, size: int, bad: BadItemLog) -> Image.Image | None:
    """The image at model size, or None after recording why it could not be read."""
    try:
        return load_image(path, size=size or None)
    except ImageReadError as e:
        msg = str(e)
        bad.add(path, msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg)
        return None


def make_row(*, image_id: str, patient_id: str, split: str, image: Image.Image, report: str,
             labels: dict[str, int], findings: list[Finding], source: str,
             meta: dict[str, Any]) -> dict[str, Any]:
    """One row in the llm-cxr schema (see :mod:`llm_cxr.data.schema`); real data has no masks."""
    return {
        "id": image_id,
        "patient_id": patient_id,
        "split": split,
        # PNG bytes, not the PIL image: `datasets` would store a path for an image that
        # still knows its file name, and that path would point at the unresized original.
        "image": {"bytes": png_bytes(image), "path": None},
        "report": report,
        "findings": findings_to_json(findings),
        "labels": labels,
        "masks": [],
        "source": source,
        "meta": json.dumps({k: v for k, v in meta.items() if v not in (None, "")}, sort_keys=True,
                           ensure_ascii=False),
    }


def _describe(item: Any) -> str:
    """An item's name for the bad-item list: a path, or a table row's label, kept short."""
    text = str(item[0] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) else item)
    return text if len(text) <= 200 else text[:200] + "..."


def job_key(items: Sequence[Any], opts: ImportOptions) -> dict[str, Any]:
    """What, beyond the importer's info, makes two runs the same job (see :func:`write_dataset`'s resume):
    the row limit and the exact list of source items."""
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\0")
    return {"limit": opts.limit, "items": h.hexdigest()}


def stream(items: Sequence[Any], to_row: Callable[[Any], dict[str, Any] | None], opts: ImportOptions,
           job: WriteJob, desc: str) -> Iterator[dict[str, Any]]:
    """Yield ``to_row(item)`` for each item (None = skipped), up to ``opts.limit`` rows.

    Starts at ``job.start`` (a resumed job: the items before it are written or were bad) and
    records its position in ``job`` before each row, so that :func:`write_dataset` can resume.
    """
    n = job.rows_done
    if opts.limit is not None and n >= opts.limit:
        return
    with tqdm(total=len(items), initial=job.start, desc=desc, unit="img", disable=not opts.progress) as bar:
        for i in range(job.start, len(items)):
            try:
                row = to_row(items[i])
            except (ValueError, TypeError, KeyError, OSError) as e:
                # an item no check foresaw must not end a long job: it is listed as bad, with what went wrong
                job.add(_describe(items[i]), f"could not be converted ({type(e).__name__}: {e})")
                row = None
            job.position = i + 1
            bar.update(1)
            if row is None:
                bar.set_postfix(rows=n, bad=len(job), refresh=False)
                continue
            n += 1
            yield row
            if opts.limit is not None and n >= opts.limit:
                log.info("%s: stopped at --limit %d rows", desc, opts.limit)
                break
