"""Clinical efficacy (CE) of generated reports, the protocol of the report-generation literature.

A labeler reads the generated and the reference report of each study; each of the 14 CheXpert
observations (Irvin et al., AAAI 2019) is then a binary classification, positive vs. the rest
(negative or not mentioned), scored by precision, recall and F1 per class, micro-averaged (counts
pooled over classes) and macro-averaged, over all 14 and over the five most common classes of
MIMIC-CXR (atelectasis, cardiomegaly, consolidation, edema, pleural effusion), as in Miura et al.
(NAACL 2021) and the papers that compare with it. Uncertain mentions are counted both ways (as
positive, CheXpert's "U-Ones", and as negative), since papers differ and the gap is informative.

The labeler here is the project's rule-based one (:mod:`llm_cxr.data.labeler`), not CheXpert's
or CheXbert: numbers are comparable between systems scored by this module, and comparable to
published CE numbers only as far as the two labelers agree.

Per-study counts (true/false positives, false negatives per class) are kept rather than only the
totals, so that any resample of studies can be re-scored (:mod:`llm_cxr.evaluation.bootstrap`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from llm_cxr.data.schema import CHEXPERT_14, UNCERTAIN, Finding

# The five most common CheXpert classes of MIMIC-CXR, the subset most CE tables report.
CHEXPERT_5: tuple[str, ...] = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")
UNCERTAIN_AS = {"uncertain_as_positive": 1, "uncertain_as_negative": 0}


def binarize(labels: Mapping[str, int | None], classes: Sequence[str], uncertain_as: int) -> np.ndarray:
    """0/1 per class: positive -> 1, negative or not mentioned -> 0, uncertain -> ``uncertain_as``."""
    out = np.zeros(len(classes), dtype=np.int8)
    for j, c in enumerate(classes):
        v = labels.get(c)
        out[j] = uncertain_as if v == UNCERTAIN else int(v == 1)
    return out


def study_counts(pred: Sequence[Mapping[str, int | None]], ref: Sequence[Mapping[str, int | None]],
                 classes: Sequence[str] = CHEXPERT_14, uncertain_as: int = 1) -> np.ndarray:
    """``(studies, classes, 3)`` int array of (true positive, false positive, false negative)."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predicted label sets for {len(ref)} reference ones")
    p = np.stack([binarize(x, classes, uncertain_as) for x in pred]) if pred else np.zeros((0, len(classes)), np.int8)
    r = np.stack([binarize(x, classes, uncertain_as) for x in ref]) if ref else np.zeros((0, len(classes)), np.int8)
    return np.stack([(p == 1) & (r == 1), (p == 1) & (r == 0), (p == 0) & (r == 1)], axis=-1).astype(np.int32)


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def scores_from_counts(counts: np.ndarray, classes: Sequence[str] = CHEXPERT_14,
                       subsets: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Micro and macro P/R/F1 (over ``classes`` and each named subset) and per-class scores.

    ``counts`` is per study ``(n, C, 3)`` or already summed ``(C, 3)``. ``macro_f1`` averages the
    classes with at least one reference positive (a class absent from the references has no
    defined recall); ``macro_f1_all`` averages every class with F1 = 0 where undefined, as
    scikit-learn's ``zero_division=0`` does in most published CE code.
    """
    total = counts.sum(axis=0) if counts.ndim == 3 else counts
    subsets = {"14": classes} if subsets is None else subsets
    per_class = {}
    for j, c in enumerate(classes):
        tp, fp, fn = (int(x) for x in total[j])
        p, r, f = _prf(tp, fp, fn)
        per_class[c] = {"precision": p, "recall": r, "f1": f, "support": tp + fn, "predicted": tp + fp}
    out: dict = {}
    for name, members in subsets.items():
        idx = [classes.index(c) for c in members]
        tp, fp, fn = total[idx].sum(axis=0)
        p, r, f = _prf(float(tp), float(fp), float(fn))
        supported = [per_class[c]["f1"] for c in members if per_class[c]["support"] > 0]
        out[name] = {"micro_precision": p, "micro_recall": r, "micro_f1": f,
                     "macro_f1": float(np.mean(supported)) if supported else 0.0,
                     "macro_f1_all": float(np.mean([per_class[c]["f1"] for c in members])),
                     "macro_classes": len(supported)}
    out["per_class"] = per_class
    return out


def sides(findings: Iterable[Finding]) -> dict[str, list[str]]:
    """The sides each finding of a report is stated on (bilateral = both), for laterality agreement."""
    got: dict[str, set[str]] = {}
    for f in findings:
        if f.laterality:
            got.setdefault(f.name, set()).update({"left", "right"} if f.laterality == "bilateral" else {f.laterality})
    return {k: sorted(v) for k, v in got.items()}


def laterality_counts(pred: Mapping[str, list[str]], ref: Mapping[str, list[str]]) -> tuple[int, int]:
    """(agreeing, compared) over the findings whose side both reports state."""
    both = set(pred) & set(ref)
    return sum(sorted(pred[k]) == sorted(ref[k]) for k in both), len(both)


def label_texts(texts: Sequence[str]) -> list[tuple[dict[str, int | None], dict[str, list[str]]]]:
    """The labeler's CheXpert labels and stated sides of each text."""
    from llm_cxr.data.labeler import label_report

    out = []
    for t in texts:
        res = label_report(t or "")
        out.append(({c: res.labels.get(c) for c in CHEXPERT_14}, sides(res.findings)))
    return out
