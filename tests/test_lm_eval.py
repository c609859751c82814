"""VQA evaluation: per-finding presence accuracy adds up to the presence accuracy."""

import pytest

from llm_cxr.evaluation.lm_eval import EvalConfig, evaluate_vqa

from test_modeling import make_codes_dataset


class _SaysYes:
    def answer(self, codes, questions, batch_size=16):
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
