"""MIMIC-CXR-JPG (Johnson et al., PhysioNet 2019) with the MIMIC-CXR free-text reports.

Layout (as downloaded from PhysioNet)::

    ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, ..., split (train / validate / test)
    ROOT/mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id, study_id, 14 CheXpert columns (optional)
    REPORTS/files/pXX/pSUBJECT/sSTUDY.txt    one report per study (REPORTS defaults to ROOT)

Only the chosen view positions are kept (frontal PA/AP by default). A report gives the
``FINDINGS:``/``IMPRESSION:`` sections; a study whose report has neither is skipped as a bad
item rather than falling back to the full text, whose EXAMINATION/INDICATION/COMPARISON
lines would teach a model to write headers, not findings. The official split is used
(``validate`` -> ``val``); images it does not list get a per-patient split.

Labels: the official CheXpert labels (Irvin et al., AAAI 2019), when the CSV is present,
set the 14 CheXpert classes (1.0 -> 1, 0.0 -> 0, -1.0 -> -1 uncertain, blank -> 0); the
rule-based labeler (``label=dataset_labels``) fills ``findings`` and the finer names (nodule, mass,
devices) that CheXpert does not have.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from llm_cxr.data.dataset import BadItemLog, WriteJob, WriteSummary, write_dataset
from llm_cxr.data.importers.common import (
    ImportOptions,
    Labeler,
    LabelFn,
    find_table,
    job_key,
    load_or_skip,
    make_row,
    read_csv,
    require_dir,
    sectioned_report,
    stream,
)
from llm_cxr.data.schema import CHEXPERT_14, assign_split

log = logging.getLogger(__name__)

SOURCE = "mimic-cxr-jpg"
METADATA, SPLIT, CHEXPERT = "mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-split", "mimic-cxr-2.0.0-chexpert"
_SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
# CSV header -> schema name, e.g. "Enlarged Cardiomediastinum" -> "enlarged_cardiomediastinum".
CHEXPERT_COLUMNS = {name.replace("_", " ").title(): name for name in CHEXPERT_14}
_CHEXPERT_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": 0}


class MimicImage(NamedTuple):
    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    procedure: str
    rows: str
    columns: str


def import_mimic(root: str | Path, *, reports_root: str | Path | None = None,
                 views: tuple[str, ...] = ("PA", "AP"), out: str | Path, size: int = 512, seed: int = 0,
                 limit: int | None = None, label: LabelFn | None = None,
                 progress: bool = True) -> WriteSummary:
    """Convert MIMIC-CXR-JPG + reports to an llm-cxr dataset at ``out`` (see the module doc)."""
    opts = ImportOptions(out, size, seed, limit, label, progress)
    root = require_dir(root, "MIMIC-CXR-JPG root")
    reports_root = require_dir(reports_root if reports_root is not None else root, "MIMIC-CXR reports root")
    require_dir(root / "files", "MIMIC-CXR-JPG image folder")
    views = tuple(v.strip().upper() for v in views if v.strip())
    images, n_other_view = _read_metadata(find_table(root, METADATA), views)
    split_path = find_table(root, SPLIT, required=False)
    splits = _read_splits(split_path) if split_path else {}
    chexpert_path = find_table(root, CHEXPERT, required=False)
    chexpert = _read_chexpert(chexpert_path) if chexpert_path else {}
    labeler = Labeler(opts.label)
    info: dict[str, Any] = {
        "source": SOURCE, "root": str(root), "reports_root": str(reports_root), "views": list(views),
        "size": opts.size, "seed": opts.seed, "n_candidates": len(images), "n_other_views": n_other_view,
        "split_source": "official" if splits else f"per-patient hash (seed {opts.seed})",
        "label_source": ("chexpert csv + " if chexpert else "") + labeler.name,
    }
    log.info("MIMIC-CXR-JPG: %d images in views %s (%d other views left out)", len(images), views, n_other_view)

    cache: dict[Path, tuple[str, dict[str, str]] | str] = {}

    def to_row(img: MimicImage, bad: BadItemLog) -> dict[str, Any] | None:
        image_path = root / _study_dir(img) / f"{img.dicom_id}.jpg"
        report_path = reports_root / _study_dir(img).with_suffix(".txt")
        if report_path not in cache:  # images come grouped by study: one read per study
            cache.clear()
            cache[report_path] = _read_report(report_path)
        report = cache[report_path]
        if isinstance(report, str):
            bad.add(image_path, report)
            return None
        pixels = load_or_skip(image_path, opts.size, bad)
        if pixels is None:
            return None
        text, sections = report
        labels, findings = labeler(text)
        official = chexpert.get((img.subject_id, img.study_id))
        if official is not None:
            labels.update(official)
        split = splits.get(img.dicom_id) or assign_split(img.subject_id, opts.seed)
        meta = {"view": img.view, "procedure": img.procedure, "original_path": str(image_path.relative_to(root)),
                "report_path": str(report_path.relative_to(reports_root)), "study_id": img.study_id,
                "original_size": [img.columns, img.rows], "labels_from": "chexpert" if official else labeler.name,
                **sections}
        return make_row(image_id=img.dicom_id, patient_id=img.subject_id, split=split, image=pixels,
                        report=text, labels=labels, findings=findings, source=SOURCE, meta=meta)

    def rows(bad: WriteJob):
        yield from stream(images, lambda img: to_row(img, bad), opts, bad, "import mimic")

    return write_dataset(rows, opts.out, info, key=job_key(images, opts))


def _study_dir(img: MimicImage) -> Path:
    return Path("files") / f"p{img.subject_id[:2]}" / f"p{img.subject_id}" / f"s{img.study_id}"


def _read_metadata(path: Path, views: tuple[str, ...]) -> tuple[list[MimicImage], int]:
    keep, n_other = [], 0
    for r in read_csv(path, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                      optional=["PerformedProcedureStepDescription", "Rows", "Columns"]):
        view = r["ViewPosition"].upper()
        if views and view not in views:
            n_other += 1
            continue
        keep.append(MimicImage(r["dicom_id"], _int_str(r["subject_id"]), _int_str(r["study_id"]), view,
                               r.get("PerformedProcedureStepDescription", ""), r.get("Rows", ""),
                               r.get("Columns", "")))
    # Grouped by study, so one report read serves all of a study's images.
    keep.sort(key=lambda m: (m.subject_id, m.study_id, m.dicom_id))
    return keep, n_other


def _int_str(value: str) -> str:
    """IDs as written in the folder names ("10000032", also when a CSV wrote "10000032.0")."""
    return value[:-2] if value.endswith(".0") else value


def _read_splits(path: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    unknown: set[str] = set()
    for r in read_csv(path, ["dicom_id", "split"]):
        name = _SPLIT_NAMES.get(r["split"].lower())
        if name is None:
            unknown.add(r["split"])
            continue
        splits[r["dicom_id"]] = name
    if unknown:
        log.warning("%s: unknown split names %s; those images get a per-patient split", path, sorted(unknown))
    return splits


def _read_chexpert(path: Path) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    n_bad = 0
    for r in read_csv(path, ["subject_id", "study_id", *CHEXPERT_COLUMNS]):
        try:
            labels = {name: _CHEXPERT_VALUES[r[col]] for col, name in CHEXPERT_COLUMNS.items()}
        except KeyError as e:
            n_bad += 1
            log.debug("%s: study %s has label value %s", path, r["study_id"], e)
            continue
        out[(_int_str(r["subject_id"]), _int_str(r["study_id"]))] = labels
    if n_bad:
        log.warning("%s: %d row(s) with values other than 1.0/0.0/-1.0/blank ignored; those studies "
                    "are labelled from their report", path, n_bad)
    return out


def _read_report(report_path: Path) -> tuple[str, dict[str, str]] | str:
    """(canonical report, other sections), or the problem in words."""
    try:
        text = report_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"report {report_path} does not exist"
    except OSError as e:
        return f"cannot read report {report_path} ({e.strerror or e})"
    if not text.strip():
        return f"report {report_path} is empty"
    report = sectioned_report(text)
    if report is None:
        return f"report {report_path} has no FINDINGS or IMPRESSION section"
    return report
