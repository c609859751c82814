"""VQA evaluation: per-finding presence accuracy adds up to the presence accuracy."""

import json

import pytest

from llm_cxr.data.schema import FINDING_NAMES
from llm_cxr.prompts import NAMES

from llm_cxr.evaluation.lm_eval import EvalConfig, evaluate_vqa

from test_modeling import make_codes_dataset


class _SaysYes:
    def answer(self, codes, questions, batch_size=16, max_new_tokens=24):
        if isinstance(questions, str):  # the checklist: one question for every image
            return ["; ".join(f"{NAMES[n]}: yes" for n in FINDING_NAMES)] * len(codes)
        assert len(codes) == len(questions)
        return ["yes"] * len(questions)


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
