"""Datasets in no particular layout: a table of image paths and reports, or a bare folder.

Table (CSV, TSV, JSONL, or a JSON list of objects): one row per image, with an image path
column (relative to ``root``, default the table's folder, or absolute) and a report column.
A report with ``FINDINGS:``/``IMPRESSION:`` headers keeps those sections; a report without
any recognised header (free text, e.g. case notes) is taken whole as the findings; a report
with headers but neither of those two sections is a bad item. Without a patient column
each row is its own patient (then two images of one person may land in different splits:
name the column if you have it). ``id`` comes from an ``id`` column when there is one,
else from the image path. Every other column is kept in ``meta["columns"]``.

Folder: every PNG/JPEG/TIFF/BMP/DICOM below it (DICOM also without an extension, by its
``DICM`` magic), with an empty report, all-zero labels and no findings; each image is its
own patient.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llm_cxr.data.dataset import BadItemLog, WriteJob, WriteSummary, write_dataset
from llm_cxr.data.images import IMAGE_SUFFIXES, is_dicom
from llm_cxr.data.importers.common import (
    ImportOptions,
    Labeler,
    LabelFn,
    check_columns,
    has_section_headers,
    job_key,
    load_or_skip,
    make_row,
    read_csv,
    require_dir,
    sectioned_report,
    stream,
)
from llm_cxr.data.reports import format_report
from llm_cxr.data.schema import assign_split, empty_labels
from llm_cxr.errors import DatasetError, NothingUsableError

log = logging.getLogger(__name__)

TABLE_SOURCE, FOLDER_SOURCE = "table", "folder"
_COLUMN_HINT = "Name the right columns with --image-column, --report-column, --patient-column"
_INVALID = "\0invalid"  # key of a JSONL line that could not be parsed (never a real column)


def import_table(path: str | Path, *, image_column: str = "image", report_column: str = "report",
                 patient_column: str | None = None, root: str | Path | None = None, out: str | Path,
                 size: int = 512, seed: int = 0, limit: int | None = None, label: LabelFn | None = None,
                 progress: bool = True) -> WriteSummary:
    """Convert a CSV/JSONL table of (image path, report) rows to an llm-cxr dataset at ``out``."""
    opts = ImportOptions(out, size, seed, limit, label, progress)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"table {path} does not exist" if not path.exists() else f"{path} is not a file")
    root = require_dir(root, "image root") if root is not None else path.parent
    required = [image_column, report_column] + ([patient_column] if patient_column else [])
    records = _read_table(path, required)
    labeler = Labeler(opts.label)
    info: dict[str, Any] = {"source": TABLE_SOURCE, "table": str(path), "root": str(root), "size": opts.size,
                            "seed": opts.seed, "n_candidates": len(records), "label_source": labeler.name,
                            "patients": patient_column or "one per row"}
    seen: set[str] = set()

    def to_row(item: tuple[str, dict[str, Any]], bad: BadItemLog) -> dict[str, Any] | None:
        line, rec = item
        where = f"{path} {line}"
        if _INVALID in rec:
            bad.add(where, rec[_INVALID])
            return None
        rel = _text(rec.get(image_column))
        if not rel:
            bad.add(where, f"empty {image_column!r} (image path)")
            return None
        image_path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not Path(rel).name:  # "/", ".", "..": no file name at all
            bad.add(where, f"{rel!r} is not a file name (image path)")
            return None
        report = _table_report(_text(rec.get(report_column)))
        if isinstance(report, str):
            bad.add(image_path, f"{where}: {report}")
            return None
        image_id = _text(rec.get("id")) or Path(rel).with_suffix("").as_posix()
        patient = _text(rec.get(patient_column)) if patient_column else image_id
        if not patient:
            bad.add(image_path, f"{where}: empty patient id in column {patient_column!r}")
            return None
        if image_id in seen:
            bad.add(image_path, f"{where}: duplicate id {image_id!r}")
            return None
        pixels = load_or_skip(image_path, opts.size, bad)
        if pixels is None:
            return None
        seen.add(image_id)
        text, sections = report
        labels, findings = labeler(text)
        used = (image_column, report_column, patient_column, "id")
        others = {k: _text(v) for k, v in rec.items() if k not in used}
        meta = {"view": others.get("view") or others.get("ViewPosition"), "original_path": rel,
                "table_row": line, "columns": {k: v for k, v in others.items() if v}, **sections}
        return make_row(image_id=image_id, patient_id=patient, split=assign_split(patient, opts.seed),
                        image=pixels, report=text, labels=labels, findings=findings,
                        source=TABLE_SOURCE, meta=meta)

    def rows(bad: WriteJob):
        seen.update(bad.ids_done)  # a resumed job: the rows already written count as seen
        yield from stream(records, lambda r: to_row(r, bad), opts, bad, f"import {path.name}")

    return write_dataset(rows, opts.out, info, key=job_key(records, opts))


def import_folder(path: str | Path, *, out: str | Path, size: int = 512, seed: int = 0,
                  limit: int | None = None, label: LabelFn | None = None, progress: bool = True) -> WriteSummary:
    """Convert a folder of images (searched recursively) to an llm-cxr dataset without text.

    ``label`` is accepted for symmetry with the other importers; there is no text to label.
    """
    opts = ImportOptions(out, size, seed, limit, label, progress)
    folder = require_dir(path, "image folder")
    files, n_ignored = _image_files(folder)
    if not files:
        raise NothingUsableError(f"no image files ({', '.join(IMAGE_SUFFIXES)} or DICOM) under {folder}")
    info: dict[str, Any] = {"source": FOLDER_SOURCE, "root": str(folder), "size": opts.size, "seed": opts.seed,
                            "n_candidates": len(files), "n_ignored_files": n_ignored}

    def to_row(file: Path, bad: BadItemLog) -> dict[str, Any] | None:
        pixels = load_or_skip(file, opts.size, bad)
        if pixels is None:
            return None
        rel = file.relative_to(folder)
        image_id = rel.with_suffix("").as_posix()
        return make_row(image_id=image_id, patient_id=image_id, split=assign_split(image_id, opts.seed),
                        image=pixels, report="", labels=empty_labels(), findings=[], source=FOLDER_SOURCE,
                        meta={"original_path": rel.as_posix()})

    def rows(bad: WriteJob):
        yield from stream(files, lambda f: to_row(f, bad), opts, bad, "import folder")

    return write_dataset(rows, opts.out, info, key=job_key(files, opts))


# ---- helpers -----------------------------------------------------------------------------

def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN
        return ""
    return str(value).strip()


def _table_report(text: str) -> tuple[str, dict[str, str]] | str:
    """(canonical report, other sections), or the problem in words."""
    if not text:
        return "empty report"
    report = sectioned_report(text)
    if report is not None:
        return report
    if has_section_headers(text):
        return "report has section headers but no FINDINGS or IMPRESSION section"
    return format_report(text, ""), {}  # free text: all of it is the findings


def _read_table(path: Path, required: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """("row N" / "line N", record) pairs; missing columns are fatal, since no row could be used."""
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        rows = read_csv(path, required, delimiter="\t" if ".tsv" in name else ",", all_columns=True,
                        hint=_COLUMN_HINT)
        # Data rows count from 1 ("row N", not a line number: quoted cells may span lines).
        return [(f"row {i}", r) for i, r in enumerate(rows, start=1)]
    if name.endswith((".jsonl", ".ndjson", ".json")):
        records = _read_json(path)
        found = sorted({k for _, r in records for k in r if k != _INVALID})
        check_columns(path, found, required, _COLUMN_HINT)
        return records
    raise DatasetError(f"{path}: unknown table format; use .csv, .tsv, .jsonl or .json")


def _read_json(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    if path.name.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(items, list):
            raise DatasetError(f"{path} holds a JSON {type(items).__name__}; expected a list of objects")
        pairs = [(f"item {i}", r) for i, r in enumerate(items, start=1)]
    else:
        pairs = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pairs.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                # One broken line loses one row, not the file; the row check below records it.
                log.warning("%s:%d is not valid JSON (%s); skipped", path, i, e)
                pairs.append((f"line {i}", {_INVALID: f"not valid JSON ({e})"}))
    return [(i, r if isinstance(r, dict) else {_INVALID: "not a JSON object"}) for i, r in pairs]


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (sorted; hidden files and folders skipped), and how many
    other files were ignored. Files without a known image extension are kept when they
    carry the DICOM magic (DICOM files are often named ``IM0001`` or by their UID)."""
    files, n_ignored = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or _has_dicom_magic(path):
            files.append(path)
        else:
            n_ignored += 1
    if n_ignored:
        log.info("%s: ignored %d file(s) that are not images", folder, n_ignored)
    return files, n_ignored


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_dicom(path.name, f.read(132))
    except OSError:
        return False
