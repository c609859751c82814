"""Clinical-efficacy scores: do the findings in a text match the reference findings?

The findings of a predicted report are read by the rule-based labeler
(:mod:`llm_cxr.data.labeler`), then compared per finding name with the reference
(micro/macro precision, recall and F1, as in the CheXpert-based clinical-efficacy metrics
of report-generation papers, e.g. Miura et al., NAACL 2021), plus the exact-match rate
of the whole finding set and the accuracy of laterality on correctly found findings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from llm_cxr.data.schema import FINDING_NAMES, Finding


@dataclass
class ClassScore:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClinicalScores:
    n: int
    micro_precision: float
    micro_recall: float
    micro_f1: float
    macro_f1: float
    exact_match: float  # share of studies whose finding-name set is exactly right
    laterality_accuracy: float | None  # over true positives whose reference states a side
    per_class: dict[str, ClassScore] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        return [{"finding": k, "precision": v.precision, "recall": v.recall, "f1": v.f1, "support": v.support}
                for k, v in self.per_class.items()]


def _sides(findings: Iterable[Finding], name: str) -> frozenset[str]:
    sides: set[str] = set()
    for f in findings:
        if f.name == name and f.laterality:
            sides |= {"left", "right"} if f.laterality == "bilateral" else {f.laterality}
    return frozenset(sides)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def score_findings(preds: Sequence[Sequence[Finding]], refs: Sequence[Sequence[Finding]],
                   names: Sequence[str] = FINDING_NAMES) -> ClinicalScores:
    """Compare predicted with reference findings, study by study."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    tp = dict.fromkeys(names, 0)
    fp = dict.fromkeys(names, 0)
    fn = dict.fromkeys(names, 0)
    exact = lat_total = lat_ok = 0
    for pred, ref in zip(preds, refs):
        p_names = {f.name for f in pred} & set(names)
        r_names = {f.name for f in ref} & set(names)
        exact += p_names == r_names
        for name in names:
            if name in p_names and name in r_names:
                tp[name] += 1
                ref_sides = _sides(ref, name)
                if ref_sides:
                    lat_total += 1
                    lat_ok += _sides(pred, name) == ref_sides
            elif name in p_names:
                fp[name] += 1
            elif name in r_names:
                fn[name] += 1
    per_class = {}
    for name in names:
        p, r, f = _prf(tp[name], fp[name], fn[name])
        per_class[name] = ClassScore(p, r, f, tp[name] + fn[name])
    mp, mr, mf = _prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    supported = [c.f1 for c in per_class.values() if c.support > 0]
    n = len(refs)
    return ClinicalScores(
        n=n,
        micro_precision=mp,
        micro_recall=mr,
        micro_f1=mf,
        macro_f1=sum(supported) / len(supported) if supported else 0.0,
        exact_match=exact / n if n else 0.0,
        laterality_accuracy=lat_ok / lat_total if lat_total else None,
        per_class=per_class,
    )


def score_reports(texts: Sequence[str], refs: Sequence[Sequence[Finding]],
                  names: Sequence[str] = FINDING_NAMES) -> ClinicalScores:
    """Label each text with the rule-based labeler and score it against ``refs``.

    Findings the labeler reads as uncertain ("possible effusion") count as predicted.
    """
    from llm_cxr.data.labeler import label_report

    preds = [label_report(t).findings for t in texts]
    return score_findings(preds, refs, names)
