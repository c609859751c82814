"""The finding head (llm_cxr/lm/addons/head.py, trained by llm_cxr/train/addons.py): targets, training on a
separable toy task, sides, thresholds, save/load, and the guided prompt's items with sides."""

import json

import pytest
import torch

from llm_cxr.data.schema import Finding, findings_from_json
from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.addons.head import HEAD_FILE, FindingHead, load_head, save_head
from llm_cxr.lm.prompts import _join, check_items, get_template, guide_items, report_prompt
from llm_cxr.train.addons import finding_targets, train_finding_head, tune_thresholds, usable

GRID = 4


def _row(findings, source="synthetic", labels=None):
    return {"findings": json.dumps([f.to_dict() for f in findings]), "source": source, "labels": labels or {}}


def test_targets_follow_findings_sides_and_hedges():
    rows = [_row([Finding("pleural_effusion", laterality="right"), Finding("cardiomegaly")]),
            _row([Finding("nodule", laterality="left"), Finding("nodule", laterality="right")]),
            _row([]),
            _row([Finding("pneumothorax", laterality="left")], source="mimic",
                 labels={"pneumothorax": 1, "pleural_effusion": -1, "cardiomegaly": 0})]
    names = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule"]
    t = finding_targets(rows, names)
    assert t.present.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, -1, 1, -1]]
    # a side is known only where the finding is present and lateralised; two nodules: both sides
    assert t.left.tolist() == [[-1, 0, -1, -1], [-1, -1, -1, 1], [-1] * 4, [-1, -1, 1, -1]]
    assert t.right.tolist() == [[-1, 1, -1, -1], [-1, -1, -1, 1], [-1] * 4, [-1, -1, 0, -1]]
    names2, t2 = usable(t, names)
    assert names2 == ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule"]
    never = finding_targets([_row([])] * 3, names)
    with pytest.raises(ConfigError, match="present in some training images"):
        usable(never, names)


def _toy(n, seed):
    """Codes on a 4x4 grid: code 1 in the left half = a 'left' finding A, in the right half = 'right' A; code 2
    anywhere = finding B (no side). Background codes 3..7."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(3, 8, (n, GRID, GRID), generator=g)
    side = torch.randint(0, 3, (n,), generator=g)  # 0 none, 1 left, 2 right
    has_b = torch.rand(n, generator=g) < 0.4
    rows = []
    for i in range(n):
        fs = []
        if side[i] == 1:
            codes[i, 1, 0] = 1
            fs.append(Finding("pleural_effusion", laterality="left"))
        elif side[i] == 2:
            codes[i, 2, 3] = 1
            fs.append(Finding("pleural_effusion", laterality="right"))
        if has_b[i]:
            codes[i, 0, 2] = 2
            fs.append(Finding("cardiomegaly"))
        rows.append(_row(fs))
    return codes.reshape(n, -1), rows


def test_head_learns_findings_and_sides_and_round_trips(tmp_path):
    torch.manual_seed(0)
    names = ["cardiomegaly", "pleural_effusion"]
    codes, rows = _toy(600, 0)
    vcodes, vrows = _toy(200, 1)
    head = FindingHead(torch.randn(8, 4), GRID, names, width=16, features=16, regions=(1, 2))
    res = train_finding_head(head, codes, finding_targets(rows, names), epochs=15, batch_size=32, lr=1e-2,
                             progress=False, autocast=False)
    assert res["steps"] == int(15 * 600 / 32)
    assert head.sided.tolist() == [False, True]  # cardiomegaly never has a side
    m = tune_thresholds(head, vcodes, finding_targets(vrows, names))
    assert m["micro_f1"] > 0.95 and m["side_accuracy"] > 0.95 and set(m["thresholds"]) == set(names)
    tcodes, trows = _toy(50, 2)
    want = [guide_items(findings_from_json(r["findings"]), names, sides=True) for r in trows]
    got = head.predict(tcodes)
    assert sum(g == w for g, w in zip(got, want)) >= 45
    assert any("pleural_effusion:left" in g for g in got) and any("pleural_effusion:right" in g for g in got)
    assert head.predict(tcodes, sides=False) == [[i.split(":")[0] for i in g] for g in got]

    save_head(head, tmp_path, m)
    back = load_head(tmp_path)
    assert torch.equal(back.probabilities(tcodes), head.probabilities(tcodes))
    assert torch.equal(back.thresholds, head.thresholds) and torch.equal(back.sided, head.sided)
    assert back.metrics["micro_f1"] == m["micro_f1"]
    assert load_head(tmp_path / "nowhere") is None
    (tmp_path / HEAD_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a valid finding head"):
        load_head(tmp_path)


def test_guide_items_with_sides_and_their_phrases():
    fs = [Finding("pleural_effusion", laterality="left"), Finding("pleural_effusion", laterality="right"),
          Finding("cardiomegaly"), Finding("chest_tube", laterality="right")]
    assert guide_items(fs) == ["cardiomegaly", "pleural_effusion", "chest_tube"]  # checklist order, names only
    items = guide_items(fs, sides=True)
    assert items == ["cardiomegaly", "pleural_effusion:bilateral", "chest_tube:right"]
    assert _join(items) == "cardiomegaly, bilateral pleural effusion and right chest tube"
    text = "".join(p for p in report_prompt(get_template("compact"), findings=items) if isinstance(p, str))
    assert "Checklist findings: cardiomegaly, bilateral pleural effusion and right chest tube" in text
    assert check_items([" pleural_effusion:right", "chest_tube", ""]) == ["pleural_effusion:right", "chest_tube"]
    with pytest.raises(InputError, match="unknown sides"):
        check_items(["pleural_effusion:up"])
    with pytest.raises(InputError, match="unknown finding names"):
        check_items(["effusion:left"])


def test_agreement_prefers_images_that_show_what_was_asked():
    head = FindingHead(torch.randn(8, 4), GRID, ["cardiomegaly", "pleural_effusion"], width=4, features=4,
                       regions=(1, 1))
    with torch.no_grad():  # every image: cardiomegaly unlikely, a left effusion likely
        head.head.weight.zero_()
        head.head.bias.copy_(torch.tensor([[-3.0, 3.0], [0.0, 3.0], [0.0, -3.0]]).flatten())
    head.sided.copy_(torch.tensor([False, True]))
    codes = torch.zeros(4, GRID * GRID, dtype=torch.long)
    score = head.agreement(codes, [["pleural_effusion:left"], ["pleural_effusion:right"], ["pleural_effusion"],
                                   ["cardiomegaly", "pleural_effusion:left", "unknown_thing"]])
    # no side asked: the side logits do not count; the right side asked of a left effusion costs ~3 per side logit
    assert score[2] > score[0] > score[3] and score[0] > score[1]
    assert torch.allclose(score[0] - score[1], torch.tensor(6.0), atol=0.01)
    assert torch.allclose(score[0] - score[3], torch.tensor(3.0), atol=0.01)  # cardiomegaly asked, unlikely


def test_requested_findings_reads_positive_findings_with_sides():
    from llm_cxr.lm.prompts import requested_findings

    assert requested_findings("FINDINGS: Small right pleural effusion. Possible pneumothorax. No consolidation.\n"
                              "IMPRESSION: Right pleural effusion.") == ["pleural_effusion:right"]
    assert requested_findings("IMPRESSION: No acute cardiopulmonary process.") == []


def test_score_reading_counts_findings_and_sides_as_a_guided_prompt_states_them():
    from llm_cxr.evaluation.lm_eval import score_reading

    refs = [[Finding("pleural_effusion", laterality="left"), Finding("pleural_effusion", laterality="right")],
            [Finding("pneumothorax", laterality="right"), Finding("chest_tube", laterality="right")]]
    stated = [["pleural_effusion:left", "cardiomegaly"], ["chest_tube:right"]]
    got = score_reading(stated, refs)
    # tp: effusion, chest tube; fp: cardiomegaly; fn: pneumothorax. Sides: two effusions are bilateral (wrong), the
    # tube's right side is right
    assert got == {"micro_f1": 4 / 6, "side_accuracy": 0.5, "n_sided": 2}
    assert score_reading([["pleural_effusion"]], refs[:1])["side_accuracy"] is None  # no side stated: not judged


def test_edit_training_keeps_targets_true_to_each_edit(tmp_path):
    """The head's edit training (llm_cxr/train/edits.py): an edit away from findings leaves every finding's cells
    and the targets as they were; an edit of a whole finding sets its cells to the image's commonest code and makes
    it absent, its side unknown, the other targets unchanged."""
    from test_modeling import GRID as CODE_GRID
    from test_modeling import make_codes_dataset

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.train.addons import _codes_of
    from llm_cxr.train.edits import CodeEdits

    rows = load_dataset(make_codes_dataset(tmp_path / "codes", n=24))
    names = ["pleural_effusion", "pneumothorax", "nodule", "mass", "consolidation", "chest_tube", "pacemaker"]
    edits = CodeEdits.from_rows(rows, names, CODE_GRID, share=1.0)
    assert edits.cells.shape == (len(rows), len(names), CODE_GRID ** 2) and bool(edits.cells.any())
    assert CodeEdits.from_rows(rows, names, CODE_GRID, share=0.0) is None
    assert CodeEdits.from_rows(rows.remove_columns("masks"), names, CODE_GRID, share=1.0) is None
    t = finding_targets(rows, names)
    codes, idx = _codes_of(rows), torch.arange(len(rows))
    present = t.present.clone()
    present[(present == 1) & ~edits.cells.any(2)] = 0  # the toy codes: count only findings that have cells
    seen = {"background": 0, "finding": 0}
    for seed in range(6):
        c, p, left, right = edits.apply(codes, idx, present, t.left, t.right, torch.Generator().manual_seed(seed))
        for b in range(len(rows)):
            gone = torch.nonzero((present[b] == 1) & (p[b] == 0)).squeeze(1).tolist()
            changed = c[b] != codes[b]
            if gone:
                (k,) = gone
                seen["finding"] += 1
                assert bool((c[b, edits.cells[b, k]] == codes[b].mode().values).all())
                assert not bool(changed[~edits.cells[b, k]].any())
                assert left[b, k] == -1 and right[b, k] == -1
                keep = torch.arange(len(names)) != k
                assert torch.equal(p[b, keep], present[b, keep]) and torch.equal(left[b, keep], t.left[b, keep])
            else:
                assert torch.equal(p[b], present[b]) and torch.equal(left[b], t.left[b])
                on = present[b] == 1
                if bool(on.any()):
                    assert not bool(changed[edits.cells[b][on].any(0)].any())
                seen["background"] += int(bool(changed.any()))
    assert seen["finding"] > 0 and seen["background"] > 0
    none = CodeEdits(edits.cells, share=0.0).apply(codes, idx, present, t.left, t.right, torch.Generator())
    assert torch.equal(none[0], codes) and torch.equal(none[1], present)
