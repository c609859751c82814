"""The llm-cxr dataset schema: one row per image, the same for synthetic and real data.

A dataset is a Hugging Face ``datasets.Dataset`` saved with ``save_to_disk`` (Arrow), with
these columns:

=============  ==========================================================================
``id``         unique image id (string)
``patient_id`` patient id; splits are assigned per patient, never per image
``split``      ``"train"``, ``"val"`` or ``"test"``
``image``      grayscale (mode ``L``) PIL image, stored as PNG
``report``     free-text report, ``FINDINGS: ...`` / ``IMPRESSION: ...`` sections
``findings``   JSON list of :class:`Finding` dicts (structured ground truth, or what the
               labeler extracted for real data)
``labels``     struct of int8 per name in :data:`LABEL_NAMES`: 1 positive, 0 negative or
               not mentioned, -1 uncertain
``masks``      list of ``{"finding": name, "mask": L-mode PNG, 255 inside}``; empty for
               real data
``source``     where the row came from (``"synthetic"``, ``"mimic-cxr-jpg"``, ...)
``meta``       JSON object with anything else worth keeping (view, original path, ...)
=============  ==========================================================================
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from llm_cxr.errors import DatasetError

# Pathologies the synthetic generator draws, each with a pixel mask.
PATHOLOGIES: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "mass",
    "edema",
    "atelectasis",
)
# Support devices the generator draws.
DEVICES: tuple[str, ...] = ("endotracheal_tube", "central_line", "chest_tube", "pacemaker")
FINDING_NAMES: tuple[str, ...] = PATHOLOGIES + DEVICES

# The CheXpert-14 observation classes (Irvin et al., AAAI 2019), snake_case.
CHEXPERT_14: tuple[str, ...] = (
    "no_finding",
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
)
# Every label the labeler produces: CheXpert-14 plus the finer synthetic names.
LABEL_NAMES: tuple[str, ...] = CHEXPERT_14 + tuple(n for n in FINDING_NAMES if n not in CHEXPERT_14)

LATERALITIES = ("left", "right", "bilateral")
SPLITS = ("train", "val", "test")

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# Which CheXpert classes a fine-grained finding implies (besides its own name).
_IMPLIES: dict[str, tuple[str, ...]] = {
    "consolidation": ("lung_opacity",),
    "edema": ("lung_opacity",),
    "atelectasis": ("lung_opacity",),
    "nodule": ("lung_lesion",),
    "mass": ("lung_lesion",),
    "endotracheal_tube": ("support_devices",),
    "central_line": ("support_devices",),
    "chest_tube": ("support_devices",),
    "pacemaker": ("support_devices",),
}


@dataclass
class Finding:
    """One finding of a study, as the generator planted it or the labeler read it."""

    name: str
    laterality: str | None = None  # "left" | "right" | "bilateral" | None
    location: str | None = None  # e.g. "right lower lobe", "apical", "basal", "perihilar"
    severity: str | None = None  # e.g. "small" | "moderate" | "large" | "mild" | "severe"
    size_mm: float | None = None  # nodule / mass diameter
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"ctr": 0.61}

    def __post_init__(self) -> None:
        if self.laterality is not None and self.laterality not in LATERALITIES:
            raise ValueError(
                f"Finding {self.name!r}: laterality must be one of {LATERALITIES} or None, "
                f"got {self.laterality!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DatasetError(f"Finding has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def findings_to_json(findings: Iterable[Finding]) -> str:
    return json.dumps([f.to_dict() for f in findings], sort_keys=True)


def findings_from_json(text: str) -> list[Finding]:
    try:
        items = json.loads(text) if text else []
    except json.JSONDecodeError as e:
        raise DatasetError(f"findings column is not valid JSON: {e}") from e
    return [Finding.from_dict(d) for d in items]


def empty_labels() -> dict[str, int]:
    return {name: NEGATIVE for name in LABEL_NAMES}


def labels_from_findings(findings: Iterable[Finding]) -> dict[str, int]:
    """Ground-truth labels of a study whose every finding is known (absent = negative)."""
    labels = empty_labels()
    any_pathology = False
    for f in findings:
        if f.name not in labels:
            raise DatasetError(f"unknown finding name {f.name!r}; known: {', '.join(FINDING_NAMES)}")
        labels[f.name] = POSITIVE
        for implied in _IMPLIES.get(f.name, ()):
            labels[implied] = POSITIVE
        if f.name not in DEVICES:
            any_pathology = True
    # CheXpert's "No Finding" ignores support devices.
    labels["no_finding"] = NEGATIVE if any_pathology else POSITIVE
    return labels


def assign_split(patient_id: str, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split for a patient: the same patient always lands in the same split."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    h = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def dataset_features():
    """The ``datasets.Features`` every llm-cxr dataset has."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "patient_id": datasets.Value("string"),
            "split": datasets.Value("string"),
            "image": datasets.Image(),
            "report": datasets.Value("string"),
            "findings": datasets.Value("string"),
            "labels": {name: datasets.Value("int8") for name in LABEL_NAMES},
            "masks": datasets.List({"finding": datasets.Value("string"), "mask": datasets.Image()}),
            "source": datasets.Value("string"),
            "meta": datasets.Value("string"),
        }
    )


REQUIRED_COLUMNS: tuple[str, ...] = ("id", "patient_id", "split", "image", "report", "findings", "labels", "masks")
