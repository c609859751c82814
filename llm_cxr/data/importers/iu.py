"""IU X-ray (Demner-Fushman et al., JAMIA 2016) in the layout of its Kaggle copy.

::

    ROOT/indiana_reports.csv       uid, MeSH, Problems, image, indication, comparison, findings, impression
    ROOT/indiana_projections.csv   uid, filename, projection (Frontal / Lateral)
    ROOT/images/images_normalized/ the PNGs, e.g. 1_IM-0001-4001.dcm.png (or pass images_dir)

IU has one study per patient, so ``patient_id`` is the report ``uid``; the split is a
per-patient hash. The report is the ``findings`` and ``impression`` columns; a study with
both empty is a bad item. ``MeSH`` and ``Problems`` (the collection's own annotations) go
to ``meta`` as an independent reference for the labeler.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llm_cxr.data.dataset import BadItemLog, WriteJob, WriteSummary, write_dataset
from llm_cxr.data.importers.common import (
    ImportOptions,
    Labeler,
    LabelFn,
    job_key,
    load_or_skip,
    make_row,
    read_csv,
    require_dir,
    stream,
)
from llm_cxr.data.reports import format_report
from llm_cxr.data.schema import assign_split
from llm_cxr.errors import DatasetError

log = logging.getLogger(__name__)

SOURCE = "iu-xray"
REPORTS, PROJECTIONS = "indiana_reports.csv", "indiana_projections.csv"


def import_iu(root: str | Path, *, images_dir: str | Path | None = None, frontal_only: bool = True,
              out: str | Path, size: int = 512, seed: int = 0, limit: int | None = None,
              label: LabelFn | None = None, progress: bool = True) -> WriteSummary:
    """Convert IU X-ray (Kaggle layout) to an llm-cxr dataset at ``out`` (see the module doc)."""
    opts = ImportOptions(out, size, seed, limit, label, progress)
    root = require_dir(root, "IU X-ray root")
    images_dir = _images_dir(root, images_dir)
    reports = {r["uid"]: r for r in read_csv(_table(root, REPORTS), ["uid", "findings", "impression"],
                                             optional=["MeSH", "Problems", "indication", "comparison"])}
    projections = list(read_csv(_table(root, PROJECTIONS), ["uid", "filename", "projection"]))
    n_all = len(projections)
    if frontal_only:
        projections = [p for p in projections if p["projection"].strip().lower() == "frontal"]
    projections.sort(key=lambda p: (_uid_key(p["uid"]), p["filename"]))
    labeler = Labeler(opts.label)
    info: dict[str, Any] = {
        "source": SOURCE, "root": str(root), "images_dir": str(images_dir), "size": opts.size,
        "seed": opts.seed, "frontal_only": frontal_only, "n_candidates": len(projections),
        "n_other_views": n_all - len(projections), "label_source": labeler.name,
    }

    def to_row(p: dict[str, str], bad: BadItemLog) -> dict[str, Any] | None:
        image_path = images_dir / p["filename"]
        rep = reports.get(p["uid"])
        if rep is None:
            bad.add(image_path, f"no report with uid {p['uid']} in {root / REPORTS}")
            return None
        text = format_report(_cell(rep["findings"]), _cell(rep["impression"]))
        if not text:
            bad.add(image_path, f"report uid {p['uid']} in {root / REPORTS} has empty findings and impression")
            return None
        pixels = load_or_skip(image_path, opts.size, bad)
        if pixels is None:
            return None
        labels, findings = labeler(text)
        meta = {"view": p["projection"], "original_path": p["filename"], "uid": p["uid"],
                "mesh": rep.get("MeSH"), "problems": rep.get("Problems"),
                "indication": _cell(rep.get("indication", "")), "comparison": _cell(rep.get("comparison", ""))}
        return make_row(image_id=_image_id(p["filename"]), patient_id=p["uid"],
                        split=assign_split(p["uid"], opts.seed), image=pixels, report=text, labels=labels,
                        findings=findings, source=SOURCE, meta=meta)

    def rows(bad: WriteJob):
        yield from stream(projections, lambda p: to_row(p, bad), opts, bad, "import iu")

    return write_dataset(rows, opts.out, info, key=job_key(projections, opts))


def _table(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise DatasetError(f"{root} has no {name}; expected the Kaggle IU X-ray layout "
                           f"({REPORTS}, {PROJECTIONS}, images/images_normalized/; see data/README.md)")
    return path


def _images_dir(root: Path, images_dir: str | Path | None) -> Path:
    if images_dir is not None:
        return require_dir(images_dir, "IU X-ray image folder")
    for candidate in (root / "images" / "images_normalized", root / "images"):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{root} has neither images/images_normalized/ nor images/; "
                       "pass the image folder with --images")


def _cell(value: str | None) -> str:
    """Empty for the blanks pandas wrote as NaN/None."""
    value = (value or "").strip()
    return "" if value.lower() in ("nan", "none") else value


def _uid_key(uid: str) -> tuple[int, str]:
    return (int(uid), uid) if uid.isdigit() else (1 << 62, uid)


def _image_id(filename: str) -> str:
    """``1_IM-0001-4001.dcm.png`` -> ``1_IM-0001-4001``."""
    name = Path(filename).name
    for suffix in (".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name
