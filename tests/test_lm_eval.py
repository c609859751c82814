"""VQA evaluation: per-finding presence accuracy adds up to the presence accuracy."""

import json

import pytest

from llm_cxr.data.schema import FINDING_NAMES
from llm_cxr.prompts import NAMES

from llm_cxr.evaluation.lm_eval import EvalConfig, evaluate_vqa

from test_modeling import make_codes_dataset


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
