"""Explanations (llm_cxr.explain): every method through the same cases and the one forward; invariants only
(shapes, finiteness, hooks gone, the bottleneck's formula and its efficient form equal to the naive one)."""

import numpy as np
import pytest
import torch
from test_forward import _run_with_every_addon
from test_modeling import GRID, N_CODES

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.explain import METHODS, explain
from llm_cxr.explain.cases import image_to_report, report_to_image, sentences
from llm_cxr.explain.m2ib import M2IBSettings, capacity, m2ib
from llm_cxr.explain.result import Explanation
from llm_cxr.explain.tail import decoder_layers, hooks, replace_input, tail_matches


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return _run_with_every_addon(tmp_path_factory.mktemp("explain"))


CODES = torch.tensor([(3 * i + 1) % N_CODES for i in range(GRID * GRID)])


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capacity_is_the_gaussian_kl_of_m2ib():
    mu, var = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([1.0, 0.25, 0.5])
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, var.sqrt()),
                                             torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(capacity(mu, var), want)
    assert float(capacity(torch.zeros(1), torch.ones(1))) == 0.0  # everything replaced by noise: no information


def test_sentences_of_a_report_skip_section_headers():
    text = "FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Left effusion."
    assert [text[a:b] for a, b in sentences(text)] == ["Small left pleural effusion.", "No pneumothorax.",
                                                        "Left effusion."]


def test_cases_point_at_the_image_codes_and_the_target_tokens(gen):
    case = image_to_report(gen, CODES, "Small left pleural effusion. No pneumothorax.", (0, 28))
    assert len(case.sources) == GRID * GRID and bool(gen.map.is_image_id(case.ids[0, case.sources]).all())
    assert torch.equal(case.ids[0, case.sources] - gen.map.first_id, CODES)
    picked = case.ids[0, 1:][case.target.bool()]
    assert gen.tok.decode(picked).strip() == "Small left pleural effusion."
    drawn = report_to_image(gen, "Small left pleural effusion.", CODES)
    assert drawn.words == ["Small", "left", "pleural", "effusion."] and len(drawn.word_of) == len(drawn.sources)
    assert int(drawn.target.sum()) == GRID * GRID and bool(drawn.image.drawn.any())


def test_the_upper_blocks_alone_reproduce_the_full_forward(gen):
    case = image_to_report(gen, CODES, "No pneumothorax.")
    assert all(tail_matches(gen.cxr, case.batch(), layer) for layer in range(2))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_finite_map_per_sentence_and_leaves_no_hook(gen, method):
    before = _hook_count(gen.cxr)
    ex = explain(gen, image=CODES, method=method, target="small left pleural effusion")
    assert ex.maps.shape == (1, GRID, GRID) and np.isfinite(ex.maps).all() and ex.method == method
    assert _hook_count(gen.cxr) == before
    if method in ("occlusion",):
        with pytest.raises(InputError, match="image -> report"):
            explain(gen, report="Small left pleural effusion.", method=method)
        return
    words = explain(gen, report="Small left pleural effusion.", method=method)
    assert words.maps.shape == (1, 4) and words.words[-1] == "effusion." and np.isfinite(words.maps).all()


def test_m2ib_computes_the_layers_below_once_and_agrees_with_the_naive_form(gen):
    case = image_to_report(gen, CODES, "Small left pleural effusion.")
    fast = m2ib(gen.cxr, case, M2IBSettings(layer=1, steps=3, samples=4))
    slow = m2ib(gen.cxr, case, M2IBSettings(layer=1, steps=3, samples=4, naive=True))
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-3)
    assert bool((fast >= 0).all()) and fast.shape == (GRID * GRID,)
    # another target phrase, another optimisation: the map depends on what is explained
    other = m2ib(gen.cxr, image_to_report(gen, CODES, "Enlarged cardiac silhouette."), M2IBSettings(layer=1, steps=3,
                                                                                                      samples=4))
    assert not torch.allclose(fast, other)


def test_hooks_are_removed_after_an_exception(gen):
    owner, name = decoder_layers(gen.cxr.lm)
    before = _hook_count(gen.cxr)

    def boom(h):
        raise RuntimeError("inside the hooked forward")

    with pytest.raises(RuntimeError, match="inside"), hooks(replace_input(gen.cxr.lm, 0, boom)):
        gen.cxr(torch.tensor([[1, 2, 3]]))
    assert _hook_count(gen.cxr) == before and len(getattr(owner, name)) == gen.cxr.lm.config.num_hidden_layers


def test_bad_targets_are_clear_errors(gen):
    with pytest.raises(InputError, match="empty"):
        explain(gen, image=CODES, target="   ")
    with pytest.raises(InputError, match="stop words"):
        explain(gen, image=CODES, target="the of a")
    with pytest.raises(InputError, match="exactly one"):
        explain(gen, image=CODES, report="x")


def test_an_explanation_saves_loads_and_plots(gen, tmp_path, monkeypatch):
    from PIL import Image

    # every sentence of the model's own report (this untrained model's is fixed here: it writes no sentence)
    monkeypatch.setattr(gen, "generate_report", lambda *a, **k: ["FINDINGS: Small left effusion. No pneumothorax."])
    ex = explain(gen, image=CODES, method="random")
    assert ex.targets == ["Small left effusion.", "No pneumothorax."] and ex.maps.shape == (2, GRID, GRID)
    back = Explanation.load(ex.save(tmp_path / "ex"))
    assert back.targets == ex.targets and np.array_equal(back.maps, ex.maps) and back.codes == CODES.tolist()
    pngs = back.plot(tmp_path / "plots", Image.new("L", (64, 64), 90))
    assert len(pngs) == len(ex.targets) and Image.open(pngs[0]).size == (64, 64)
    words = explain(gen, report="Small left pleural effusion.", method="random")
    page = words.plot(tmp_path / "words")[0].read_text()
    assert "pleural" in page and "effusion." in page


def test_cli_explains_a_drawing_and_refuses_bad_input(gen, tmp_path, capsys):
    import json

    from llm_cxr.cli import main

    out = tmp_path / "ex"
    assert main(["explain", "--model", str(gen.run.folder), "--report", "Small left pleural effusion.",
                 "--method", "m2ib", "--set", "steps=2", "--set", "samples=2", "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["direction"] == "report->image" and (out / "words.html").exists()
    assert Explanation.load(out).maps.shape == (1, 4)
    assert main(["explain", "--model", str(gen.run.folder), str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["explain", "--model", str(gen.run.folder), "--report", "the of", "--out", str(out)]) == 2
    assert "stop words" in capsys.readouterr().err


def test_localisation_metrics_on_known_maps():
    from llm_cxr.explain.metrics import dilate, mask_cells, mass_in_mask, pointing_game

    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[12:16, 0:4] = 255  # bottom-left corner of a 4x4 grid
    cells = mask_cells(mask, 4)
    assert cells.sum() == 1 and cells[3, 0]
    assert dilate(cells).sum() == 4 and not dilate(cells)[0, 3]  # no wrap-around
    m = np.zeros((4, 4))
    m[3, 0] = 1.0
    assert pointing_game(m, cells) and mass_in_mask(m, cells) == 1.0
    m[3, 0], m[2, 1] = 0.0, 1.0  # one cell off diagonally: inside the dilated mask, outside the mask
    assert pointing_game(m, cells) and mass_in_mask(m, cells) == 0.0
    m[2, 1], m[0, 3] = 0.0, 1.0
    assert not pointing_game(m, cells)


def test_deletion_and_insertion_curves_end_where_they_must(gen):
    from llm_cxr.explain.baselines import _score
    from llm_cxr.explain.metrics import deletion_insertion

    case = image_to_report(gen, CODES, "Small left pleural effusion.")
    res = deletion_insertion(gen, case, torch.arange(GRID * GRID, dtype=torch.float32), fractions=(0, 0.5, 1))
    with torch.no_grad():
        full = float(_score(gen.cxr, case, case.ids)[0])
    assert res["full"] == pytest.approx(full, abs=1e-5)
    assert res["deletion"][0] == pytest.approx(full, abs=1e-5) and res["insertion"][-1] == pytest.approx(full, abs=1e-5)
    assert res["deletion"][-1] == pytest.approx(res["insertion"][0], abs=1e-5) == pytest.approx(res["blank"], abs=1e-5)
    if np.exp(res["full"]) > np.exp(res["blank"]):  # rescaled to the evidence: 1 on the whole image, 0 on the blank
        for key in ("deletion", "insertion"):
            curve = (np.exp(res[key]) - np.exp(res["blank"])) / (np.exp(res["full"]) - np.exp(res["blank"]))
            assert res[f"{key}_area"] == pytest.approx(float(np.trapezoid(curve, [0, 0.5, 1])), rel=1e-5)
    else:
        assert res["deletion_area"] is None and res["insertion_area"] is None


def test_the_pipeline_re_reads_the_changed_codes_for_a_guided_prompt(gen, monkeypatch):
    """Faithfulness through the pipeline as it runs: a guided run's prompt states what the finding head reads from
    the *changed* codes, so each row is scored with the prompt built for it; with ``pipeline=False`` (the LM's
    route alone) the case's stated list is kept."""
    from llm_cxr.explain.baselines import _score
    from llm_cxr.explain.cases import with_codes
    from llm_cxr.explain.metrics import pipeline_scores

    def reading(codes, guided=None, **kw):  # a stand-in head: an effusion wherever the first code is odd
        return [["pleural_effusion:left"] if int(c[0]) % 2 == 1 else [] for c in codes]

    monkeypatch.setattr(gen, "stated_findings", reading)
    case = image_to_report(gen, CODES, "FINDINGS: Small left pleural effusion. No pneumothorax.", (10, 38),
                           stated=["pleural_effusion:left"])
    assert case.label == "Small left pleural effusion." and case.response.startswith("FINDINGS")
    rows = torch.stack([CODES, CODES.roll(1), CODES.flip(0), (CODES + 1) % N_CODES])
    lists = [tuple(r) for r in reading(rows)]
    assert len(set(lists)) == 2  # both prompts occur, so the rows are scored in two groups
    got = pipeline_scores(gen, case, rows)
    for row, items, score in zip(rows, lists, got):
        other = with_codes(gen, case, row, list(items))
        assert torch.equal(other.ids[0, other.sources] - gen.map.first_id, row)
        assert score == pytest.approx(float(_score(gen.cxr, other, other.ids)[0]), abs=1e-4)
    fixed = pipeline_scores(gen, case, rows, pipeline=False)
    for row, score in zip(rows, fixed):
        ids = case.ids.clone()
        ids[0, case.sources] = gen.map.first_id + row
        assert score == pytest.approx(float(_score(gen.cxr, case, ids)[0]), abs=1e-4)
    assert got[0] == pytest.approx(fixed[0], abs=1e-4)  # the case's own codes: the same prompt either way


def test_evaluation_on_a_dataset_with_masks_scores_every_focal_finding(tmp_path):
    """On the synthetic generator's studies: each focal finding with a mask that a sentence of the report states
    becomes a target (that sentence, with the finding's cells), and every method gets pointing-game and
    mass-in-mask figures in [0, 1] (faithfulness for the ones asked)."""
    from test_modeling import make_codes_dataset

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.data.labeler import label_report
    from llm_cxr.explain.evaluate import FOCAL, evaluate_methods, sanity, stated_targets, targets_of

    rows = list(load_dataset(make_codes_dataset(tmp_path / "codes", n=30)))
    targets = [t for r in rows for t in targets_of(r, GRID)]
    assert targets and all(t.finding in FOCAL and t.cells.any() and t.phrase for t in targets)
    gen = _run_with_every_addon(tmp_path / "run")
    truth = {str(r["id"]): r["report"] for r in rows}
    stated, counts = stated_targets(gen, rows, reports=truth)
    assert stated and counts["stated"] == len(stated) <= counts["findings"] == len(targets)
    for t in stated:  # the sentence the target explains states the finding, and sits in the report
        assert label_report(t.phrase).labels.get(t.finding) == 1 and t.report[t.span[0]:t.span[1]].strip() == t.phrase
    sparse = {k: (v if i % 2 else "The lungs are clear.") for i, (k, v) in enumerate(truth.items())}
    assert stated_targets(gen, rows, reports=sparse)[1]["stated"] < counts["stated"]  # unstated findings are skipped
    res = evaluate_methods(gen, rows[:10], {"random": {}, "m2ib": {"steps": 2, "samples": 2}}, reports=truth)
    assert res["targets"] == res["stated"] > 0
    for name in ("random", "m2ib"):
        m = res["methods"][name]
        assert 0 <= m["pointing"] <= 1 and 0 <= m["mass_in_mask"] <= 1 and m["per_finding"]
        assert m["no_evidence"] == res["targets"] or np.isfinite([m["deletion_area"], m["insertion_area"]]).all()
        assert 0 <= m["confidence_drop"] <= 1 and 0 <= m["confidence_increase"] <= 1
    phrases = evaluate_methods(gen, rows[:10], {"random": {}}, faithfulness=(), phrases=True)
    assert phrases["targets"] == len([t for r in rows[:10] for t in targets_of(r, GRID)])
    before = {k: v.clone() for k, v in gen.cxr.lm.state_dict().items()}
    checks = sanity(gen, rows, n=2, reports=truth, layer=0, steps=2, samples=2)
    assert [r["randomised up to"] for r in checks["randomised"]] == ["LM block 2", "LM block 1"]
    assert all(-1 <= r["rank correlation"] <= 1 and r["targets"] == 2 for r in checks["randomised"])
    assert all(torch.equal(v, before[k]) for k, v in gen.cxr.lm.state_dict().items())


def test_a_guided_sentence_is_explained_through_both_routes(gen, monkeypatch):
    """For a run that writes from its finding head's reading, M2IB also bottlenecks what the head reads, fitting
    the head's decisions the sentence states, and combines the maps; routes="lm" keeps the LM's route alone."""
    from llm_cxr.explain import attribute
    from llm_cxr.explain.routes import combine, head_decisions, m2ib_head
    from llm_cxr.lm.addons.head import FindingHead

    torch.manual_seed(0)
    head = FindingHead(torch.randn(N_CODES, 4), GRID, ["cardiomegaly", "pleural_effusion", "pneumothorax"], width=4,
                       features=4, regions=(1, 2))
    head.sided.copy_(torch.tensor([False, True, True]))
    decisions = head_decisions(head, "Small left pleural effusion. No pneumothorax.")
    assert decisions == {"pleural_effusion": (True, "left"), "pneumothorax": (False, None)}
    assert head_decisions(head, "The lungs are clear.") == {}
    hm = m2ib_head(head, CODES, decisions, M2IBSettings(steps=3, samples=4))
    assert hm.shape == (GRID * GRID,) and bool((hm >= 0).all()) and torch.isfinite(hm).all()
    both = combine(torch.rand(GRID * GRID), hm)
    assert float(both.min()) >= 0 and float(both.max()) <= 1

    monkeypatch.setattr(gen, "finding_head", head)
    case = image_to_report(gen, CODES, "Small left pleural effusion.", None, stated=["pleural_effusion:left"])
    opts = {"layer": 1, "steps": 2, "samples": 2}
    lm_only = attribute(gen, case, "m2ib", routes="lm", **opts)
    torch.testing.assert_close(lm_only, m2ib(gen.cxr, case, M2IBSettings(**opts)))
    assert not torch.allclose(attribute(gen, case, "m2ib", **opts), lm_only)
    plain = image_to_report(gen, CODES, "Small left pleural effusion.")  # not guided: the LM's route only
    torch.testing.assert_close(attribute(gen, plain, "m2ib", **opts), m2ib(gen.cxr, plain, M2IBSettings(**opts)))
    with pytest.raises(ConfigError):
        attribute(gen, case, "random", head_beta=1.0)  # the head's bottleneck options are M2IB's


def test_route_weights_cut_one_route_at_a_time(gen, monkeypatch):
    """Each route's weight is the fall of the sentence's log-likelihood when that route alone is cut: the head's
    by taking the sentence's findings out of the stated list (nothing to take out: exactly 0), the LM's by the
    bottleneck's noise at its block (computed from the block's input once; equal to the whole forward's)."""
    from importlib import import_module

    from llm_cxr.explain.baselines import _score
    from llm_cxr.explain.routes import combine, route_weights, without_information

    m2ib_module = import_module("llm_cxr.explain.m2ib")  # the package's name m2ib is the function

    case = image_to_report(gen, CODES, "Small left pleural effusion.", None, stated=["pleural_effusion:left"])
    settings = M2IBSettings(layer=1, samples=3)
    w_lm, w_head = route_weights(gen, case, {"pleural_effusion": (True, "left")}, settings)
    with torch.no_grad():  # the head's route cut by hand: the same sentence from a prompt that states nothing
        full = float(_score(gen.cxr, case, case.ids)[0])
        bare = image_to_report(gen, CODES, "Small left pleural effusion.", None, stated=[])
        assert w_head == pytest.approx(max(0.0, full - float(_score(gen.cxr, bare, bare.ids)[0])), abs=1e-4)
        assert w_lm == pytest.approx(max(0.0, full - without_information(gen.cxr, case, settings)), abs=1e-4)
    assert route_weights(gen, case, {"pneumothorax": (False, None)}, settings)[1] == 0.0
    fast = without_information(gen.cxr, case, settings)
    monkeypatch.setattr(m2ib_module, "_tail_works", lambda *a: False)
    assert without_information(gen.cxr, case, settings) == pytest.approx(fast, abs=1e-4)
    lm, head = torch.rand(GRID * GRID), torch.rand(GRID * GRID)
    torch.testing.assert_close(combine(lm, head, (0.0, 2.0)), (head - head.min()) / (head.max() - head.min()))
    torch.testing.assert_close(combine(lm, head, (0.0, 0.0)), combine(lm, head))  # no evidence: equal weights


def test_the_randomisation_sanity_check_moves_the_map_and_restores_the_weights(gen):
    from llm_cxr.explain.metrics import cascading_randomisation, rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    case = image_to_report(gen, CODES, "Small left pleural effusion.")
    before = {k: v.clone() for k, v in gen.cxr.lm.state_dict().items()}
    logits = gen.cxr(case.ids).logits
    rows = cascading_randomisation(gen, case, lambda model, c: m2ib(model.cxr, c, M2IBSettings(layer=0, steps=2,
                                                                                                samples=2)))
    assert [r["randomised"] for r in rows] == [1, 2] and [r["last"] for r in rows] == ["LM block 2", "LM block 1"]
    assert all(-1 <= r["rank_correlation"] <= 1 for r in rows)
    assert all(torch.equal(v, before[k]) for k, v in gen.cxr.lm.state_dict().items())
    torch.testing.assert_close(gen.cxr(case.ids).logits, logits)


def test_confidence_drop_and_increase_by_construction(gen):
    from llm_cxr.explain.baselines import _score
    from llm_cxr.explain.metrics import confidence_change

    case = image_to_report(gen, CODES, "Small left pleural effusion.")
    everything = confidence_change(gen, case, torch.rand(GRID * GRID), keep=1.0)
    assert everything["drop"] == pytest.approx(0.0, abs=1e-6) and everything["increase"] == 0.0  # nothing removed
    half = confidence_change(gen, case, torch.rand(GRID * GRID), keep=0.5)
    p = float(_score(gen.cxr, case, case.ids)[0].exp())
    assert half["p"] == pytest.approx(p, rel=1e-5) and 0 <= half["drop"] <= 1
    assert half["increase"] == float(half["p_kept"] > half["p"])
    with pytest.raises(ValueError):
        confidence_change(gen, case, torch.rand(GRID * GRID), keep=0)


def test_word_mass_by_hand():
    from llm_cxr.explain.evaluate import word_mass

    words = ["Small", "left", "pleural", "effusion.", "No", "pneumothorax."]
    m = word_mass(words, np.array([1.0, 0.0, 2.0, 5.0, 1.0, 1.0]), "pleural_effusion")
    assert m["mass"] == pytest.approx(7 / 10) and m["chance"] == pytest.approx(2 / 6) and m["best_rank"] == 1
    assert word_mass(words, np.ones(6), "nodule") is None  # the report does not name it


def test_drawings_are_explained_by_the_words_of_each_finding(tmp_path):
    from test_modeling import make_codes_dataset

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.explain.evaluate import FINDING_WORDS, evaluate_drawings, targets_of

    rows = list(load_dataset(make_codes_dataset(tmp_path / "codes", n=30)))
    gen = _run_with_every_addon(tmp_path / "run")
    rows = rows[:8]
    long = next(i for i, r in enumerate(rows) if any(t.finding in FINDING_WORDS for t in targets_of(r, GRID)))
    rows[long] = {**rows[long], "report": rows[long]["report"] + " The heart is normal." * 200}  # past max_length
    res = evaluate_drawings(gen, rows, {"random": {}, "gradient_x_input": {}})
    assert res["targets"] > 0
    for m in res["methods"].values():
        assert m["n"] > 0 and 0 <= m["word_mass"] <= 1 and 0 < m["chance"] < 1 and 0 <= m["top_word"] <= 1
        assert m["cut"] >= 1  # the report too long for max_length is read as far as generation reads it (counted)


def test_a_guided_drawing_gives_the_stated_list_s_share_to_the_words_it_was_read_from(gen):
    """A guided drawing's prompt lists the findings read from the report after it; those tokens are attributed too,
    and each item's share goes to the report's words that state it, so nothing is lost and nothing lands on a word
    that does not state the item."""
    from llm_cxr.explain import word_map

    report = "Small left pleural effusion. Right chest tube in place."
    stated = ["pleural_effusion:left", "chest_tube:right"]
    plain = report_to_image(gen, report, CODES)
    case = report_to_image(gen, report, CODES, stated)
    n_report = len(plain.sources)
    assert torch.equal(case.sources[:n_report], plain.sources) and len(case.sources) > n_report
    listed = case.ids[0, case.sources[n_report:]]
    assert "pleural effusion" in gen.tok.decode(listed) and "chest tube" in gen.tok.decode(listed)
    assert set(case.item_of[n_report:]) >= {0, 1} and set(case.item_of[:n_report]) == {-1}
    words = case.words
    assert {words[i] for i in case.evidence[0]} >= {"left", "pleural", "effusion."}
    assert {words[i] for i in case.evidence[1]} >= {"Right", "chest", "tube"}
    assert not set(case.evidence[0]) & set(case.evidence[1])
    twice = report_to_image(gen, report + " IMPRESSION: Small left pleural effusion.", CODES, stated)
    assert [twice.words[i] for i in twice.evidence[0]] == ["left", "pleural", "effusion."] * 2  # both sentences
    long = report_to_image(gen, report + " The heart is normal." * 200, CODES, stated)
    assert long.cut and not case.cut and long.ids.shape[1] <= gen.max_length
    assert torch.equal(long.ids[0, long.sources[:n_report]], case.ids[0, case.sources[:n_report]])  # the same start
    assert long.evidence == case.evidence  # the list, read from the whole report, still names its words
    only_item0 = torch.tensor([1.0 if k == 0 else 0.0 for k in case.item_of])
    m = word_map(case, only_item0)
    assert m.sum() == pytest.approx(float(only_item0.sum())) and set(np.nonzero(m)[0]) == set(case.evidence[0])
    own = torch.tensor([1.0 if k == -1 else 0.0 for k in case.item_of])
    torch.testing.assert_close(torch.as_tensor(word_map(case, own)), torch.as_tensor(word_map(plain, own[:n_report])))


def test_a_guided_drawing_with_a_plan_adds_each_item_s_worth_through_the_plan(gen):
    from llm_cxr.explain import attribute, word_map
    from llm_cxr.explain.cases import plan_for
    from llm_cxr.explain.routes import combine, plan_route, share

    report = "Small left pleural effusion. Right chest tube in place."
    stated = ["pleural_effusion:left", "chest_tube:right"]
    plan = plan_for(gen, report, stated)
    assert plan is not None and int(plan.sum()) >= 2
    case = report_to_image(gen, report, CODES, stated, plan=plan)
    opts = {"layer": 1, "steps": 2, "samples": 2}
    scores, (w_lm, w_plan) = plan_route(gen, case, report, stated, M2IBSettings(**opts))
    item_of = torch.as_tensor(case.item_of)
    assert float(scores[item_of == -1].abs().sum()) == 0.0  # the plan holds items, not words
    for k in range(len(stated)):  # an item's worth, spread evenly over its list tokens
        assert torch.unique(scores[item_of == k]).numel() == 1
    lm_only = attribute(gen, case, "m2ib", routes="lm", **opts)
    torch.testing.assert_close(lm_only, m2ib(gen.cxr, case, M2IBSettings(**opts)))
    both = attribute(gen, case, "m2ib", **opts)
    torch.testing.assert_close(both, combine(lm_only, scores, (w_lm, w_plan), scale=share))
    assert np.isfinite(word_map(case, both)).all()
