"""VQA evaluation: per-finding presence accuracy adds up to the presence accuracy."""

import json

import numpy as np
import pytest
from test_modeling import make_codes_dataset

from llm_cxr.data.schema import FINDING_NAMES
from llm_cxr.evaluation.lm_eval import EvalConfig, evaluate_vqa
from llm_cxr.lm.prompts import NAMES


class _SaysYes:
    """Says yes to everything; a guided one (``guided_vqa``) reads every image as normal and says no when asked
    without its reading."""

    def __init__(self, guided_vqa=False):
        self.guided_vqa = guided_vqa
        self.images_read = 0

    def stated_findings(self, codes, guided=None, findings=None, batch_size=16, task="report"):
        assert task == "vqa"
        if not self.guided_vqa:
            return None
        self.images_read += len(codes)
        return [[] for _ in codes]

    def answer(self, codes, questions, batch_size=16, max_new_tokens=24, guided=None, findings=None):
        assert guided is False  # the evaluation states the reading itself, or asks plainly
        if isinstance(questions, str):  # the checklist: one question for every image, always the model's own
            assert findings is None
            return ["; ".join(f"{NAMES[n]}: yes" for n in FINDING_NAMES)] * len(codes)
        assert len(codes) == len(questions) and (findings is None or len(findings) == len(codes))
        return ["no" if self.guided_vqa and findings is None else "yes"] * len(questions)


def test_presence_by_finding_adds_up(tmp_path):
    from llm_cxr.data.dataset import load_dataset

    ds = load_dataset(make_codes_dataset(tmp_path / "codes", n=24))
    r = evaluate_vqa(_SaysYes(), ds, EvalConfig(n_vqa_images=24, vqa_per_image=4, progress=False))
    per = r["presence_by_finding"]
    presence = r["by_kind"]["presence"]
    assert per and sum(v["n"] for v in per.values()) == presence["n"]
    right = sum(v["accuracy"] * v["n"] for v in per.values())
    assert right / presence["n"] == pytest.approx(presence["accuracy"])
    # questions are balanced yes/no, so a model that always says yes is right on some, not all
    assert 0 < presence["accuracy"] < 1
    # an all-"yes" checklist is complete, finds every finding, and is wrong on every absent one
    c = r["checklist"]
    assert c["n_images"] == 24 and c["complete_rate"] == 1.0
    n_present = sum(len(json.loads(f)) for f in ds.select(range(24))["findings"])
    assert c["accuracy"] == pytest.approx(n_present / (24 * len(FINDING_NAMES)))
    assert not r["guided"] and r["accuracy_yes_no_laterality_unguided"] is None
    # a guided run is scored as it answers (guided) and, beside it, unguided
    guided = _SaysYes(guided_vqa=True)
    g = evaluate_vqa(guided, ds, EvalConfig(n_vqa_images=24, vqa_per_image=4, progress=False))
    assert g["guided"] and g["accuracy_yes_no_laterality"] == r["accuracy_yes_no_laterality"]
    assert guided.images_read == 24  # once per image, not once per question
    # "yes" is right on present findings, "no" on absent ones, neither on a side
    n_p, n_l = g["by_kind"]["presence"]["n"], g["by_kind"].get("laterality", {"n": 0})["n"]
    assert 0 < g["accuracy_yes_no_laterality_unguided"] < 1
    assert g["accuracy_yes_no_laterality"] + g["accuracy_yes_no_laterality_unguided"] == pytest.approx(
        n_p / (n_p + n_l))


def test_frechet_distance_matches_the_closed_form():
    """b = 2a + 1: the means differ by mean(a) + 1 and cov(b) = 4 cov(a), so the trace term is
    tr(ca) + 4 tr(ca) - 2 tr(2 ca) = tr(ca)."""
    import numpy as np

    from llm_cxr.evaluation.lm_eval import frechet_distance

    a = np.random.default_rng(0).normal(size=(400, 5)) @ np.diag([1.0, 2.0, 0.5, 1.5, 3.0])
    b = 2 * a + 1
    want = float(((a.mean(0) + 1) ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-6)
    # a general pair against scipy's matrix square root
    from scipy import linalg
    rng = np.random.default_rng(3)
    c, d = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    cc, cd, m = np.cov(c, rowvar=False), np.cov(d, rowvar=False), c.mean(0) - d.mean(0)
    want = m @ m + np.trace(cc) + np.trace(cd) - 2 * np.trace(linalg.sqrtm(cc @ cd).real)
    assert frechet_distance(c, d) == pytest.approx(want, rel=1e-6)
    # rank-deficient covariances (fewer samples than dimensions) still give a finite distance
    few = np.random.default_rng(1).normal(size=(4, 8))
    assert np.isfinite(frechet_distance(few, few + 0.5)) and frechet_distance(few, few + 0.5) > 0
    with pytest.raises(ValueError, match="2 samples"):
        frechet_distance(a[:1], b)


def test_auroc_by_hand():
    from llm_cxr.evaluation.lm_eval import auroc

    # positives 0.9 and 0.4, negatives 0.4 and 0.1: of the 4 pairs, 3 ranked right and 1 tie -> (3 + 0.5) / 4
    assert auroc(np.array([0.9, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert auroc(np.array([0.2, 0.8]), np.array([1, 0])) == 0.0
    assert auroc(np.array([0.2, 0.8]), np.array([1, 1])) is None  # one class only: undefined
