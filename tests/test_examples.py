"""Prompts, VQA from findings, tokenisation with response-only loss, truncation, length grouping."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from llm_cxr.data.schema import FINDING_NAMES, Finding
from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.prompts import (
    CHECKLIST_QUESTIONS,
    GUIDE_FOCUS,
    GUIDE_PREFIX,
    GUIDE_QUESTION,
    IMAGE,
    PLAN_INDEX,
    PLAN_ITEMS,
    TEMPLATES,
    asked_finding,
    checklist_qa,
    get_template,
    make_vqa,
    parse_checklist,
    report_text,
    stated_items,
)
from llm_cxr.lm.sequence import collate, encode_example
from llm_cxr.lm.tokens import ImageTokenMap, add_image_tokens
from llm_cxr.train.base import train_text_tokenizer
from llm_cxr.train.batching import LengthGroupedBatches
from llm_cxr.train.config import StageConfig
from llm_cxr.train.examples import study_examples, text_example

REPORT = ("FINDINGS: A large right effusion is present. The cardiac silhouette is not enlarged. No pneumothorax.\n"
          "IMPRESSION: Large right pleural effusion.")


@pytest.fixture(scope="module")
def tok_map():
    tok = train_text_tokenizer([REPORT] * 20 + ["No acute cardiopulmonary abnormality."] * 20, vocab_size=400)
    token_map = add_image_tokens(tok, None, n_codes=16, grid_size=2, vqgan_fingerprint="fp")
    return tok, token_map


def _row(findings, codes=(1, 2, 3, 4), report=REPORT):
    import json

    return {"id": "s1", "patient_id": "p1", "report": report, "codes": list(codes), "source": "synthetic",
            "findings": json.dumps([f.to_dict() for f in findings]), "labels": {}}


def test_vqa_is_balanced_and_truthful():
    findings = [Finding("pleural_effusion", "right", "basal", "large"), Finding("pneumothorax", "left")]
    qas = make_vqa(findings, random.Random(0), n=20)
    kinds = {q.kind for q in qas}
    assert {"presence", "laterality", "severity", "devices", "list"} <= kinds
    yes = [q for q in qas if q.answer == "yes"]
    no = [q for q in qas if q.answer == "no"]
    assert len(yes) == 2 and len(no) == 2
    assert all(q.finding in ("pleural_effusion", "pneumothorax") for q in yes)
    assert all(q.finding not in ("pleural_effusion", "pneumothorax") for q in no)
    lat = {q.finding: q.answer for q in qas if q.kind == "laterality"}
    assert lat == {"pleural_effusion": "right", "pneumothorax": "left"}
    assert [q.answer for q in qas if q.kind == "severity"] == ["large"]
    assert [q.answer for q in qas if q.kind == "devices"] == ["none"]
    # a normal study still gets a "no" question and the list answer
    normal = make_vqa([], random.Random(1), n=5)
    assert any(q.answer == "no" for q in normal) and any(q.answer == "no acute abnormality" for q in normal)
    # uncertain findings are never asked about
    assert all(q.finding != "edema" for q in make_vqa([], random.Random(2), n=50, uncertain=["edema"]))


def test_one_question_per_study_is_not_always_a_yes():
    """With n=1 (one question per study, as a stage may ask) presence answers stay balanced over studies;
    a fixed order once asked only positives, and a model trained on them learned to answer "yes"."""
    findings = [Finding("pleural_effusion", "right", "basal", "large"), Finding("cardiomegaly")]
    answers = [make_vqa(findings, random.Random(i), n=1)[0] for i in range(300)]
    yes = sum(q.answer == "yes" for q in answers)
    no = sum(q.answer == "no" for q in answers)
    assert yes > 60 and no > 60 and abs(yes - no) < 50
    assert any(q.kind not in ("presence",) for q in answers)


def test_impression_section():
    assert report_text(REPORT, "impression") == "IMPRESSION: Large right pleural effusion."
    assert report_text(REPORT, "findings_impression") == REPORT
    with pytest.raises(ConfigError):
        report_text(REPORT, "whatever")


def test_response_only_loss_and_image_span(tok_map):
    tok, m = tok_map
    tpl = TEMPLATES["compact"]
    exs = study_examples(_row([Finding("pleural_effusion", "right", severity="large")]), StageConfig(vqa=2), tpl, 0)
    assert [e.task for e in exs] == ["report", "image", "vqa", "vqa"]
    rep = encode_example(exs[0], tok, m, tpl, 256)
    img = encode_example(exs[1], tok, m, tpl, 256)
    span = [m.begin_id, m.first_id + 1, m.first_id + 2, m.first_id + 3, m.first_id + 4, m.end_id]
    # CXR -> report: the image is in the prompt, the report is the response, ending in EOS
    b = rep.input_ids.index(m.begin_id)
    assert rep.input_ids[b:b + len(span)] == span and b + len(span) < rep.n_prompt
    assert tok.decode(rep.input_ids[rep.n_prompt:-1]) == REPORT and rep.input_ids[-1] == tok.eos_token_id
    # report -> CXR: the response is exactly the image span + EOS
    assert img.input_ids[img.n_prompt:] == span + [tok.eos_token_id]
    batch = collate([{"input_ids": rep.input_ids, "n_prompt": rep.n_prompt},
                     {"input_ids": img.input_ids, "n_prompt": img.n_prompt}], pad_id=tok.pad_token_id)
    lab = batch.labels
    assert (lab[0, :rep.n_prompt] == -100).all() and (lab[0, rep.n_prompt:len(rep.input_ids)] >= 0).all()
    assert (lab[1, len(img.input_ids):] == -100).all() and batch.input_ids.shape[1] % 8 == 0
    assert batch.attention_mask.sum(1).tolist() == [len(rep.input_ids), len(img.input_ids)]
    # with the token map, the prompt's image is read and the response's image is drawn (and nothing else)
    image = collate([{"input_ids": rep.input_ids, "n_prompt": rep.n_prompt},
                     {"input_ids": img.input_ids, "n_prompt": img.n_prompt}], tok.pad_token_id, m).image
    codes = image.slots >= 0
    assert codes.sum(1).tolist() == [m.tokens_per_image] * 2
    assert torch.equal(image.read, codes & torch.tensor([[True], [False]]))
    assert torch.equal(image.drawn, codes & torch.tensor([[False], [True]]))


def test_truncation_cuts_the_report_never_the_image(tok_map):
    tok, m = tok_map
    tpl = TEMPLATES["compact"]
    long = REPORT + " The lungs are clear." * 60
    exs = study_examples(_row([], report=long), StageConfig(vqa=0), tpl, 0)
    rep = encode_example(exs[0], tok, m, tpl, 120)
    img = encode_example(exs[1], tok, m, tpl, 120)
    for enc in (rep, img):
        assert enc.truncated and len(enc.input_ids) <= 120
        assert sum(m.begin_id == t for t in enc.input_ids) == 1 and sum(m.end_id == t for t in enc.input_ids) == 1
        assert sum(bool(m.is_image_id(torch.tensor(t))) for t in enc.input_ids) == 4
    assert img.input_ids[img.n_prompt:][-2:] == [m.end_id, tok.eos_token_id]
    with pytest.raises(InputError, match="max_length"):
        encode_example(exs[1], tok, m, tpl, 20)
    # a guided image prompt: the report is cut, its findings list never; the image still fits whole
    (guided,) = study_examples(_row([Finding("pleural_effusion", "right")], report=long + " Right pleural effusion."),
                               StageConfig(report=0, vqa=0, image=0, image_guided=1, guide_sides=True), tpl, 0)
    enc = encode_example(guided, tok, m, tpl, 120)
    listed = tok(GUIDE_PREFIX + "right pleural effusion", add_special_tokens=False)["input_ids"]
    assert enc.truncated and len(enc.input_ids) <= 120
    prompt = enc.input_ids[:enc.n_prompt]
    assert any(prompt[i:i + len(listed)] == listed for i in range(len(prompt)))
    assert enc.input_ids[enc.n_prompt:][-2:] == [m.end_id, tok.eos_token_id]


def test_bad_codes_are_clear_errors(tok_map):
    tok, m = tok_map
    tpl = TEMPLATES["compact"]
    ex = study_examples(_row([], codes=(1, 2, 3)), StageConfig(vqa=0, image=0), tpl, 0)[0]
    with pytest.raises(InputError, match="needs 4 codes"):
        encode_example(ex, tok, m, tpl, 256)
    ex = study_examples(_row([], codes=(1, 2, 3, 99)), StageConfig(vqa=0, image=0), tpl, 0)[0]
    with pytest.raises(InputError, match=r"\[0, 15\]"):
        encode_example(ex, tok, m, tpl, 256)


def test_plain_instruction_examples(tok_map):
    tok, m = tok_map
    tpl = TEMPLATES["dolly"]
    ex = text_example({"instruction": "Say hi", "context": "", "response": "hi"}, tpl)
    enc = encode_example(ex, tok, m, tpl, 256)
    assert tok.decode(enc.input_ids[enc.n_prompt:]).startswith("hi")
    with pytest.raises(InputError):
        text_example({"instruction": "x"}, tpl)
    assert IMAGE not in ex.prompt


def test_length_grouping_reduces_padding_and_shards():
    lengths = np.random.default_rng(0).integers(20, 400, size=2000)
    grouped = LengthGroupedBatches(lengths, 16, seed=0, grouped=True).epoch(0)
    plain = LengthGroupedBatches(lengths, 16, seed=0, grouped=False).epoch(0)

    def waste(batches):
        return sum(16 * lengths[b].max() - lengths[b].sum() for b in batches) / sum(lengths[b].sum() for b in batches)

    assert waste(grouped) < 0.1 < waste(plain)
    r0 = LengthGroupedBatches(lengths, 16, seed=0, rank=0, world=2).epoch(3)
    r1 = LengthGroupedBatches(lengths, 16, seed=0, rank=1, world=2).epoch(3)
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))
    assert LengthGroupedBatches(lengths, 16, seed=0).epoch(1) != LengthGroupedBatches(lengths, 16, seed=0).epoch(2)


def test_checklist_answers_every_finding_in_a_fixed_order_and_parses_back():
    findings = [Finding("pleural_effusion", "right", "basal", "large"), Finding("endotracheal_tube")]
    qa = checklist_qa(findings, random.Random(0))
    assert qa.kind == "checklist" and qa.question in CHECKLIST_QUESTIONS
    said = parse_checklist(qa.answer)
    assert list(said) == list(FINDING_NAMES)  # every finding, generator order
    assert {n for n, v in said.items() if v} == {"pleural_effusion", "endotracheal_tube"}
    assert checklist_qa([], random.Random(5)).answer == checklist_qa([], random.Random(6)).answer
    # hedged findings are left out; text that is not a checklist parses to nothing
    assert "edema" not in parse_checklist(checklist_qa(findings, random.Random(0), uncertain=["edema"]).answer)
    assert parse_checklist("no acute abnormality") == {} and parse_checklist("Cardiomegaly: YES; foo: no") == {
        "cardiomegaly": True}
    # a stage made of checklists only is a valid stage
    exs = study_examples(_row(findings), StageConfig(report=0, image=0, vqa=0, checklist=1), get_template("compact"), 0)
    assert [(e.task, e.meta["kind"], e.response) for e in exs] == [("vqa", "checklist", qa.answer)]


def test_guided_report_prompt_lists_the_checklist_positives():
    findings = [Finding("endotracheal_tube"), Finding("pleural_effusion", "right", "basal", "large")]
    report = REPORT + " Endotracheal tube in place. Mild cardiomegaly. Possible edema."  # states every finding below
    stage = StageConfig(report=0, image=0, vqa=0, checklist=0, report_guided=1)
    (ex,) = study_examples(_row(findings, report=report), stage, get_template("compact"), 0)
    hint = [p for p in ex.prompt if isinstance(p, str) and p.startswith(GUIDE_PREFIX)]
    assert ex.task == "report" and ex.response == report and IMAGE in ex.prompt
    # in checklist order (what parse_checklist of a checklist answer gives back), not the findings' order
    assert hint == [GUIDE_PREFIX + "pleural effusion and endotracheal tube"]
    (normal,) = study_examples(_row([]), stage, get_template("compact"), 0)
    assert GUIDE_PREFIX + "none" in normal.prompt
    # real data: a hedged finding is neither asked about nor stated in the hint
    row = _row([Finding("edema"), Finding("cardiomegaly")]) | {"source": "mimic", "labels": {
        "edema": -1, "cardiomegaly": 1, "pneumothorax": 0}}
    (real,) = study_examples(row | {"report": report}, stage, get_template("compact"), 0)
    assert GUIDE_PREFIX + "cardiomegaly" in real.prompt
    # the writer's text-only examples: the same hint and report, no image
    text_stage = StageConfig(report=0, image=0, vqa=0, checklist=0, report_from_findings=1)
    (txt,) = study_examples(_row(findings, report=report), text_stage, get_template("compact"), 0)
    assert txt.task == "text" and txt.codes is None and IMAGE not in txt.prompt and txt.response == report
    assert GUIDE_PREFIX + "pleural effusion and endotracheal tube" in txt.prompt
    with pytest.raises(ConfigError, match="report_guided"):
        StageConfig(report_guided=-1)
    with pytest.raises(ConfigError, match="report_from_findings"):
        StageConfig(report_from_findings=-1)


def test_guided_prompts_list_what_their_target_states_and_questions_get_every_finding():
    """A guided report's prompt lists only the findings its target text states: an impression that leaves out the
    tube, trained under a prompt that lists it, would teach the writer to drop findings it is given. A guided
    question's prompt lists them all (its answer comes from the truth, not from a text)."""
    report = ("FINDINGS: Endotracheal tube in satisfactory position. A large right effusion is present.\n"
              "IMPRESSION: Large right pleural effusion.")
    findings = [Finding("endotracheal_tube"), Finding("pleural_effusion", "right", "basal", "large")]
    both = GUIDE_PREFIX + "right pleural effusion and endotracheal tube"
    stage = dict(report=0, image=0, vqa=0, checklist=0, report_guided=1, report_from_findings=1, vqa_guided=2,
                 guide_sides=True)
    exs = study_examples(_row(findings, report=report), StageConfig(sections="impression", **stage),
                         get_template("compact"), 0)
    written = [e for e in exs if e.task in ("report", "text")]
    assert [e.task for e in written] == ["report", "text"]
    assert all(GUIDE_PREFIX + "right pleural effusion" in e.prompt and both not in e.prompt for e in written)
    asked = [e for e in exs if e.task == "vqa"]
    assert len(asked) == 2 and all(IMAGE in e.prompt and e.meta["guided"] for e in asked)
    # the list, then the question again (answered next to the list, with or without the image before it)
    assert all(e.prompt[2] == both + GUIDE_QUESTION + e.prompt[0].split("\n")[1] for e in asked)
    full = study_examples(_row(findings, report=report), StageConfig(**stage), get_template("compact"), 0)
    assert all(e.prompt[-2].startswith(both) for e in full)  # the whole report states both
    assert stated_items(["pleural_effusion:right", "chest_tube:left"],
                        "IMPRESSION: Right pleural effusion. No pneumothorax.") == ["pleural_effusion:right"]
    # a hedged mention counts as stated, as the clinical score counts it
    assert stated_items(["pneumothorax", "chest_tube"], "Pneumothorax cannot be excluded. No chest tube.") == [
        "pneumothorax"]
    with pytest.raises(ConfigError, match="vqa_guided"):
        StageConfig(vqa_guided=-1)
    StageConfig(report=0, image=0, vqa=0, vqa_guided=1)  # guided questions alone are a stage


def test_tokenised_stage_cache_follows_the_code(tok_map, tmp_path, monkeypatch):
    """The tokenised examples are cached beside the dataset; a change to the code that makes them (not only to the
    stage config) must make a new cache, never reuse the old one."""
    import datasets

    import llm_cxr.train.examples as instruct

    rows = [{k: v for k, v in _row([Finding("pleural_effusion", "right")]).items() if k != "labels"} | {"id": f"s{i}"}
            for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    tok, token_map = tok_map

    def build():
        return instruct.build_stage_dataset(ds, tok, token_map, StageConfig(report=1, image=0, vqa=0), max_length=128,
                                            progress=False)

    a, b = build(), build()
    assert a._fingerprint == b._fingerprint and a.cache_files and a.cache_files == b.cache_files
    monkeypatch.setattr(instruct, "code_hash", lambda *modules: "other code")
    assert build()._fingerprint != a._fingerprint


def test_text_only_guided_questions_are_answered_by_their_list():
    """stage.vqa_from_findings: questions whose answer the findings list states (presence, and with sides the side),
    without the image; never severity, never a hedged finding; ``n`` of them even when a study has fewer distinct
    questions (later rounds reword them)."""
    findings = [Finding("pleural_effusion", "right", "basal", "large"), Finding("chest_tube", "left")]
    stage = StageConfig(report=0, image=0, vqa=0, checklist=0, vqa_from_findings=12, guide_sides=True)
    exs = study_examples(_row(findings), stage, get_template("compact"), 0)
    assert len(exs) == 12 and all(e.task == "text" and e.codes is None and IMAGE not in e.prompt for e in exs)
    listed = GUIDE_PREFIX + "right pleural effusion and left chest tube" + GUIDE_QUESTION
    assert all(e.prompt[1] == listed + e.prompt[0].split("\n")[1] and e.meta["guided"] for e in exs)
    kinds = {e.meta["kind"] for e in exs}
    assert kinds == {"presence", "laterality"}
    for e in exs:
        if e.meta["kind"] == "presence":
            assert e.response == ("yes" if e.meta["finding"] in ("pleural_effusion", "chest_tube") else "no")
        else:  # devices have no side question; the effusion's is "right"
            assert (e.meta["finding"], e.response) == ("pleural_effusion", "right")
    answers = [e.response for e in exs if e.meta["kind"] == "presence"]
    assert answers.count("no") >= 3 and answers.count("yes") >= 3
    assert len({e.prompt[0] for e in exs}) > 4  # reworded and other absent findings, not one question 12 times
    names_only = StageConfig(report=0, image=0, vqa=0, checklist=0, vqa_from_findings=6)
    exs = study_examples(_row(findings), names_only, get_template("compact"), 0)
    assert {e.meta["kind"] for e in exs} == {"presence"}
    assert all(e.prompt[1].startswith(GUIDE_PREFIX + "pleural effusion and chest tube" + GUIDE_QUESTION) for e in exs)
    # real data: a hedged finding is neither listed nor asked about
    row = _row([Finding("edema"), Finding("cardiomegaly")]) | {"source": "mimic", "labels": {
        "edema": -1, "cardiomegaly": 1, "pneumothorax": 0}}
    exs = study_examples(row, names_only, get_template("compact"), 0)
    assert exs and all(e.meta["finding"] != "edema" and e.prompt[1].startswith(GUIDE_PREFIX + "cardiomegaly\n")
                       for e in exs)
    with pytest.raises(ConfigError, match="vqa_from_findings"):
        StageConfig(vqa_from_findings=-1)
    StageConfig(report=0, image=0, vqa=0, vqa_from_findings=1)  # a stage of its own


def test_focused_questions_state_what_the_list_says_of_the_finding_asked():
    """stage.vqa_focus: a guided question's prompt ends with the list's word on the finding the question names, which
    is the answer's evidence: present (with its side) exactly when the answer is yes; every question the training
    data asks names the finding it is about."""
    for name in FINDING_NAMES:
        for qa in make_vqa([Finding(name, "left")], random.Random(name), 8):
            if qa.kind in ("presence", "laterality"):
                assert asked_finding(qa.question) == qa.finding, qa.question
    assert asked_finding("What devices are present?") is None
    findings = [Finding("pleural_effusion", "right"), Finding("edema", "bilateral"), Finding("chest_tube", "left")]
    stage = StageConfig(report=0, image=0, vqa=0, checklist=0, vqa_from_findings=12, vqa_guided=4, guide_sides=True,
                        vqa_focus=True)
    exs = [e for e in study_examples(_row(findings), stage, get_template("compact"), 0) if e.meta.get("finding")]
    assert len(exs) >= 12
    for e in exs:
        stated = e.prompt[-2].rsplit(GUIDE_FOCUS, 1)[1]
        assert (e.response != "no") == (not stated.startswith("no ")), (stated, e.response)
        if e.meta["kind"] == "laterality":
            assert stated.split()[0] == {"right": "right", "both sides": "bilateral"}[e.response]
    plain = StageConfig(report=0, image=0, vqa=0, checklist=0, vqa_from_findings=4, guide_sides=True)
    exs = study_examples(_row(findings), plain, get_template("compact"), 0)
    assert exs and not any(GUIDE_FOCUS in e.prompt[-2] for e in exs)


def test_guided_image_prompt_lists_what_the_report_states():
    """stage.image_guided: report -> image with the findings the report states, with sides, after the report; the
    image is still the whole response."""
    report = ("FINDINGS: Endotracheal tube in satisfactory position. A large right effusion is present.\n"
              "IMPRESSION: Large right pleural effusion.")
    findings = [Finding("endotracheal_tube"), Finding("pleural_effusion", "right", "basal", "large")]
    stage = StageConfig(report=0, image=0, vqa=0, checklist=0, image_guided=1, guide_sides=True)
    (ex,) = study_examples(_row(findings, report=report), stage, get_template("compact"), 0)
    assert ex.task == "image" and ex.response is None and ex.meta["guided"] and IMAGE not in ex.prompt
    assert ex.prompt[1] == report and ex.prompt[2] == GUIDE_PREFIX + "right pleural effusion and endotracheal tube"
    (imp,) = study_examples(_row(findings, report=report), StageConfig(sections="impression", **{
        "report": 0, "image": 0, "vqa": 0, "checklist": 0, "image_guided": 1, "guide_sides": True}),
        get_template("compact"), 0)
    assert imp.prompt[2] == GUIDE_PREFIX + "right pleural effusion"  # the impression leaves the tube out
    # the image plan gets the same items as the list (llm_cxr.lm.addons.plan.ImagePlan); collate makes them a multi-hot
    assert ex.meta["plan"] == ["pleural_effusion:right", "endotracheal_tube"] and imp.meta["plan"] == [
        "pleural_effusion:right"]
    rows = [{"input_ids": [1, 2, 3], "n_prompt": 1, "plan": [PLAN_INDEX[i] for i in ex.meta["plan"]]},
            {"input_ids": [4, 5], "n_prompt": 1, "plan": []}]
    m = ImageTokenMap(first_id=100, n_codes=16, begin_id=116, end_id=117, grid_size=2, vqgan_fingerprint='fp',
                      vocab_size=118)
    plan = collate(rows, pad_id=0, token_map=m).image.plan
    assert plan.shape == (2, len(PLAN_ITEMS)) and plan.sum().item() == 2 and plan[1].sum().item() == 0
    assert [PLAN_ITEMS[i] for i in plan[0].nonzero().squeeze(1).tolist()] == sorted(
        ex.meta["plan"], key=PLAN_INDEX.get)
    assert collate([{"input_ids": [1, 2], "n_prompt": 1}], pad_id=0, token_map=m).image.plan is None
    # a finding the report places in a zone of the lung is given again with its zone
    nodule = ("FINDINGS: There is a 9 mm pulmonary nodule in the left lower lobe.\n"
              "IMPRESSION: 9 mm left lower lobe nodule.")
    (ex,) = study_examples(_row([Finding("nodule", "left", "left lower lobe", size_mm=9.0)], report=nodule), stage,
                           get_template("compact"), 0)
    assert ex.prompt[2] == GUIDE_PREFIX + "left pulmonary nodule"
    assert ex.meta["plan"] == ["nodule:left", "nodule:left@lower"]
    with pytest.raises(ConfigError, match="image_guided"):
        StageConfig(image_guided=-1)


def test_plan_items_add_the_zone_the_report_places_a_finding_in():
    from llm_cxr.lm.prompts import PLAN_INDEX, location_zone, plan_items

    assert [location_zone(x) for x in ("right upper lobe", "right middle lobe", "left lower lobe", "apical",
                                         "lingula", "basal", "retrocardiac", "perihilar", None, "")] == [
        "upper", "middle", "lower", "upper", "middle", "lower", "lower", "middle", None, None]
    text = ("IMPRESSION: 12 mm right upper lobe nodule. Left lower lobe mass (3.1 cm). Small left pleural effusion. "
            "Cardiomegaly.")
    items = ["nodule:right", "mass:left", "pleural_effusion:left", "cardiomegaly"]
    assert plan_items(items, text) == items + ["nodule:right@upper", "mass:left@lower"]
    assert plan_items(["nodule", "mass"], text) == ["nodule", "mass", "nodule@upper", "mass@lower"]  # no sides
    assert plan_items(["pneumothorax"], text) == ["pneumothorax"]  # only what is asked for
    assert plan_items([], text) == []
    assert all(i in PLAN_INDEX for i in plan_items(items, text))



def test_image_focus_weighs_the_cells_that_show_the_drawn_findings(tok_map):
    """stage.image_focus: a drawn image's tokens in the grid cells that a requested finding's mask touches carry
    that weight in the loss (collate's ``weights``, aligned with ``labels``); the rest of the image and every other
    example keep 1; findings the prompt does not ask for get none; a dataset without masks trains as before."""
    import datasets
    from PIL import Image

    from llm_cxr.lm.model import CXRModel, response_loss
    from llm_cxr.train.batching import iterate_batches, lengths_of
    from llm_cxr.train.examples import build_stage_dataset, focus_slots

    def mask(y0, y1, x0, x1):
        a = np.zeros((8, 8), dtype=np.uint8)
        a[y0:y1, x0:x1] = 255
        return Image.fromarray(a)

    # a 2x2 grid over an 8x8 mask: 4x4 pixels a cell, row-major as the codes
    masks = [{"finding": "pleural_effusion", "mask": mask(5, 8, 0, 3)},  # bottom left cell
             {"finding": "chest_tube", "mask": mask(0, 2, 3, 6)}]  # top left and top right
    assert focus_slots(masks, {"pleural_effusion"}, 2) == [2]
    assert focus_slots(masks, {"pleural_effusion", "chest_tube"}, 2) == [0, 1, 2]
    assert focus_slots(masks, {"nodule"}, 2) == [] and focus_slots(None, {"nodule"}, 2) == []

    tok, token_map = tok_map
    findings = [Finding("pleural_effusion", "right", "basal", "large"), Finding("chest_tube", "right")]
    row = _row(findings) | {"masks": masks}  # the impression states the effusion only
    features = datasets.Features({"id": datasets.Value("string"), "patient_id": datasets.Value("string"),
                                  "report": datasets.Value("string"), "codes": datasets.List(datasets.Value("int32")),
                                  "source": datasets.Value("string"), "findings": datasets.Value("string"),
                                  "masks": datasets.List({"finding": datasets.Value("string"),
                                                          "mask": datasets.Image()})})
    ds = datasets.Dataset.from_list([{k: row[k] for k in features}], features=features)
    stage = dict(sections="impression", report=0, image=0, vqa=1, checklist=0, image_guided=1, guide_sides=True)
    tok_ds = build_stage_dataset(ds, tok, token_map, StageConfig(**stage, image_focus=4.0), max_length=128,
                                 progress=False)
    image = next(r for r in tok_ds if r["task"] == "image")
    assert image["focus"] == [2] and image["focus_weight"] == 4.0
    assert all(r["focus"] == [] and r["focus_weight"] == 1.0 for r in tok_ds if r["task"] != "image")
    sampler = LengthGroupedBatches(lengths_of(tok_ds), len(tok_ds), seed=0)
    _, _, batch = next(iterate_batches(tok_ds, sampler, pad_id=0))
    i = batch.labels.ne(-100).sum(1).argmax()  # the image row: its 4 codes, the span's ends, end key, EOS
    start = int(batch.labels[i].ne(-100).nonzero()[0])  # <image>
    assert batch.input_ids[i, start] == token_map.begin_id
    heavy = batch.weights.ne(1).nonzero().tolist()
    assert heavy == [[int(i), start + 1 + 2]] and batch.weights[i, start + 3] == 4.0
    # the weighted loss is the weighted mean of the response tokens' cross-entropies
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).eval()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels[:, 1:], ignore_index=-100,
                                           reduction="none")
    w = batch.labels[:, 1:].ne(-100) * batch.weights[:, 1:]
    cxr = CXRModel(model)
    assert torch.allclose(response_loss(cxr, batch, "token"), (ce * w).sum() / w.sum(), atol=1e-5)
    per_example = (ce * w).sum(1) / w.sum(1)
    assert torch.allclose(response_loss(cxr, batch, "example"), per_example.mean(), atol=1e-5)
    unweighted = dataclasses.replace(batch, weights=None)
    assert not torch.allclose(response_loss(cxr, batch, "token"), response_loss(cxr, unweighted, "token"))
    # without masks (or with image_focus 1) there are no weights
    plain = build_stage_dataset(ds.remove_columns("masks"), tok, token_map, StageConfig(**stage, image_focus=4.0),
                                max_length=128, progress=False)
    assert all(r["focus"] == [] for r in plain)
    with pytest.raises(ConfigError, match="image_focus"):
        StageConfig(image_focus=0)
