"""Scoring reports from any system: clinical efficacy, bootstrap intervals, file matching, resume, baseline, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_cxr.data.reports import format_report
from llm_cxr.data.schema import CHEXPERT_14, UNCERTAIN
from llm_cxr.data.synth import SynthConfig, sample_findings
from llm_cxr.data.synth_report import write_report
from llm_cxr.errors import InputError
from llm_cxr.evaluation import baselines, bootstrap, chexpert, report_files, reports


def _reports(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    cfg = SynthConfig()
    return [format_report(*write_report(sample_findings(rng, cfg), rng)) for _ in range(n)]


# --- clinical efficacy ------------------------------------------------------------------------------------------


def test_ce_counts_and_scores_by_hand():
    # study 1: pred {cardiomegaly, edema}, ref {cardiomegaly}; study 2: pred {}, ref {edema (uncertain)}
    pred = [{"cardiomegaly": 1, "edema": 1}, {"cardiomegaly": 0}]
    ref = [{"cardiomegaly": 1, "edema": 0}, {"edema": UNCERTAIN}]
    classes = ("cardiomegaly", "edema", "fracture")
    c = chexpert.study_counts(pred, ref, classes, uncertain_as=1)
    assert c.shape == (2, 3, 3)
    # cardiomegaly: tp 1; edema: fp 1 (study 1), fn 1 (study 2, uncertain read as positive)
    assert c.sum(0).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    s = chexpert.scores_from_counts(c, classes, {"all": classes})
    # micro: tp 1, fp 1, fn 1 -> P = R = F1 = 0.5
    assert s["all"]["micro_f1"] == pytest.approx(0.5)
    # macro over supported classes (cardiomegaly 1.0, edema 0.0); over all three also counts fracture's 0
    assert s["all"]["macro_f1"] == pytest.approx(0.5)
    assert s["all"]["macro_f1_all"] == pytest.approx(1 / 3)
    assert s["per_class"]["edema"]["support"] == 1
    # the uncertain reference as negative: edema has no reference positive left
    c0 = chexpert.study_counts(pred, ref, classes, uncertain_as=0)
    assert c0.sum(0)[1].tolist() == [0, 1, 0]


def test_laterality_counts_only_findings_both_sides_state():
    pred = {"pleural_effusion": ["left"], "pneumothorax": ["left", "right"]}
    ref = {"pleural_effusion": ["left"], "pneumothorax": ["right"], "nodule": ["left"]}
    assert chexpert.laterality_counts(pred, ref) == (1, 2)


def test_labeler_labels_agree_on_identical_texts():
    texts = _reports(20, 1)
    got = chexpert.label_texts(texts)
    c = chexpert.study_counts([g[0] for g in got], [g[0] for g in got])
    assert c[..., 1:].sum() == 0 and c[..., 0].sum() > 0  # no false positive or negative against itself


# --- bootstrap --------------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_value_and_narrows_with_more_studies():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        x = rng.normal(0.6, 0.2, size=n)
        ci = bootstrap.bootstrap_ci(lambda idx: {"mean": float(x[idx].mean())}, n, resamples=300, seed=1)["mean"]
        assert ci["low"] <= ci["value"] <= ci["high"]
        assert ci["value"] == pytest.approx(x.mean())
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower for 16x the studies
    again = bootstrap.bootstrap_ci(lambda idx: {"mean": float(x[idx].mean())}, len(x), resamples=300, seed=1)
    assert again["mean"]["low"] == ci["low"]  # seeded


def test_paired_bootstrap_tells_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    b = a - 0.1 + rng.normal(0, 0.02, 300)
    same = bootstrap.paired_bootstrap(lambda i: {"m": a[i].mean()}, lambda i: {"m": a[i].mean()}, 300, 200)
    assert same["m"]["delta"] == 0 and same["m"]["p"] == 1.0
    diff = bootstrap.paired_bootstrap(lambda i: {"m": a[i].mean()}, lambda i: {"m": b[i].mean()}, 300, 200)["m"]
    assert diff["delta"] == pytest.approx(0.1, abs=0.01)
    assert diff["low"] > 0 and diff["p"] < 0.01


# --- files ------------------------------------------------------------------------------------------------------


def test_section_text():
    r = "FINDINGS: Heart is enlarged. IMPRESSION: Cardiomegaly."
    assert report_files.section_text(r, "findings") == "Heart is enlarged."
    assert report_files.section_text(r, "impression") == "Cardiomegaly."
    assert report_files.section_text(r, "all") == "Heart is enlarged. Cardiomegaly."
    assert report_files.section_text("No headers here.", "impression") == "No headers here."
    with pytest.raises(InputError, match="section"):
        report_files.section_text(r, "history")


def test_read_reports_counts_every_problem_and_keeps_going(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_bytes(b'{"id": "a", "report": "Clear lungs."}\n'
                  b'not json\n'
                  b'{"report": "no id"}\n'
                  b'{"id": "a", "report": "again"}\n'
                  b'\xff\xfe\n'
                  b'[1, 2]\n'
                  b'{"id": "b", "report": ""}\n'
                  b'{"id": "c", "report": "Small effusion."}\n')
    problems = report_files.Problems()
    got = report_files.read_reports(p, problems=problems)
    assert got == {"a": "Clear lungs.", "b": "", "c": "Small effusion."}
    assert problems.counts()["unreadable"] == 3 and problems.no_id == [f"{p}:3"] and problems.duplicates == ["a"]
    ids = report_files.match(got, {"a": "x", "b": "y", "z": "w"}, problems)
    assert ids == ["a", "b"] and problems.missing == ["z"] and problems.unknown == ["c"] and problems.empty == ["b"]


def test_read_reports_csv_and_clear_errors(tmp_path):
    c = tmp_path / "p.csv"
    c.write_text('id,prediction\n1,"Heart, normal."\n2,Effusion.\n')
    assert report_files.read_reports(c) == {"1": "Heart, normal.", "2": "Effusion."}
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": 1, "answer": "x"}\n')
    with pytest.raises(InputError, match="no report column"):
        report_files.read_reports(bad)
    with pytest.raises(InputError, match="not a file"):
        report_files.read_reports(tmp_path)


# --- end to end -------------------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_predictions_scores_resumes_and_compares(tmp_path, monkeypatch):
    refs = _reports(40, 3)
    others = _reports(40, 4)
    _write(tmp_path / "refs.jsonl", [{"id": f"s{i}", "report": r} for i, r in enumerate(refs)])
    _write(tmp_path / "same.jsonl", [{"id": f"s{i}", "report": r} for i, r in enumerate(refs)])
    _write(tmp_path / "other.jsonl", [{"id": f"s{i}", "report": r} for i, r in enumerate(others)])
    out = tmp_path / "res"
    res = reports.evaluate_predictions(tmp_path / "same.jsonl", tmp_path / "refs.jsonl", out, resamples=50,
                                       compare=tmp_path / "other.jsonl", meteor=False)
    m = res["metrics"]
    assert res["n"] == 40 and res["coverage"] == 1.0
    for k in ("bleu_4", "rouge_l", "ce14_micro_f1", "ce5_micro_f1"):
        assert m[k]["value"] == pytest.approx(1.0) and m[k]["low"] == pytest.approx(1.0)
    paired = res["comparison"]["paired"]
    assert paired["bleu_4"]["delta"] > 0 and paired["ce14_micro_f1"]["delta"] > 0
    assert set(CHEXPERT_14) == set(res["per_class"]["uncertain_as_positive"])
    for f in ("metrics.json", "metrics.md", "per_class_f1.png", "system_per_study.jsonl"):
        assert (out / f).stat().st_size > 0
    assert (out / "per_class_f1.png").read_bytes()[:4] == b"\x89PNG"
    assert "BLEU-4" in (out / "metrics.md").read_text()

    # a kill mid-write leaves a cut line: the rerun drops it, rescores only what is missing, same numbers
    per_study = out / "system_per_study.jsonl"
    lines = per_study.read_text().splitlines()
    per_study.write_text("\n".join(lines[:30]) + "\n" + lines[30][:25])
    calls = []
    real = chexpert.label_texts
    monkeypatch.setattr(chexpert, "label_texts", lambda texts: calls.append(len(texts)) or real(texts))
    again = reports.evaluate_predictions(tmp_path / "same.jsonl", tmp_path / "refs.jsonl", out, resamples=50,
                                         meteor=False)
    assert sum(calls) == 2 * 10  # predictions and references of the 10 studies not kept
    assert again["metrics"]["bleu_4"] == m["bleu_4"]
    assert len(per_study.read_text().splitlines()) == 40


def test_cli_evaluate_predictions_and_errors(tmp_path, capsys):
    from llm_cxr.cli import main

    refs = _reports(12, 5)
    _write(tmp_path / "refs.jsonl", [{"id": i, "report": r} for i, r in enumerate(refs)])
    _write(tmp_path / "p.jsonl", [{"id": i, "report": r} for i, r in enumerate(refs[:10])] + [{"id": 99}])
    rc = main(["evaluate", "--predictions", str(tmp_path / "p.jsonl"), "--references", str(tmp_path / "refs.jsonl"),
               "--resamples", "20", "--no-meteor", "-q"])
    cap = capsys.readouterr()
    assert rc == 0 and "CheXpert-14 micro-F1" in cap.out
    assert "2 missing" in cap.err and "1 unknown" in cap.err
    assert json.loads((tmp_path / "p_metrics" / "metrics.json").read_text())["n"] == 10
    assert main(["evaluate", "--predictions", str(tmp_path / "p.jsonl")]) != 0
    assert "--references" in capsys.readouterr().err
    assert main(["evaluate", "--predictions", str(tmp_path / "nope.jsonl"), "--references",
                 str(tmp_path / "refs.jsonl")]) != 0
    assert "not a file" in capsys.readouterr().err


# --- retrieval baseline -----------------------------------------------------------------------------------------


def test_code_histograms_count_each_region():
    codes = np.arange(16).reshape(1, 16) % 5  # a 4x4 grid
    h = baselines.code_histograms(codes, codebook=5, regions=2)
    assert h.shape == (1, 20) and h.sum() == 16
    assert h.reshape(4, 5).sum(1).tolist() == [4, 4, 4, 4]  # four cells of a 2x2 split


def test_nearest_report_retrieves_itself_and_respects_sides():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 32, size=(50, 64))
    reports_ = [f"report {i}" for i in range(50)]
    got, idx, sim = baselines.nearest_report(train, reports_, train[[7, 21]], codebook=32)
    assert got == ["report 7", "report 21"] and idx.tolist() == [7, 21] and np.allclose(sim, 1.0)
    # the same codes on the other half of the grid: 1 region cannot tell them apart, 2 can
    left = np.zeros((1, 8, 8), dtype=np.int64)
    left[0, :, :4] = 5
    right = left[:, :, ::-1].copy()
    pool = np.concatenate([left, right]).reshape(2, 64)
    assert baselines.nearest_report(pool, ["L", "R"], right.reshape(1, 64), 32, regions=2)[0] == ["R"]


# --- CheXbert as the labeler (a tiny BERT in CheXbert's layout: the real weights are the user's) ----------------


def _fake_chexbert(folder):
    from transformers import BertConfig

    from llm_cxr.evaluation.chexbert import HEAD_ORDER, CheXbert

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart", "is", "enlarged", "no", "effusion", "."]
    (folder / "bert").mkdir(parents=True)
    (folder / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    config.save_pretrained(folder / "bert")
    model = CheXbert(config)
    with torch.no_grad():  # zero weights: each head's bias decides its class
        for j, head in enumerate(model.linear_heads):
            head.weight.zero_()
            head.bias.zero_()
            name = HEAD_ORDER[j]
            head.bias[{"cardiomegaly": 1, "pleural_effusion": 3, "edema": 0, "no_finding": 0}.get(name, 2)] = 5.0
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               folder / "chexbert.pth")
    return folder / "chexbert.pth", folder / "bert"


def test_chexbert_labels_map_its_four_classes(tmp_path):
    from llm_cxr.evaluation.chexbert import chexbert_labels, load_chexbert

    weights, bert = _fake_chexbert(tmp_path)
    model, tok = load_chexbert(weights, bert)
    labels = chexbert_labels(["Heart is enlarged.", "No effusion.", ""], model, tok, batch_size=2)
    assert len(labels) == 3 and set(labels[0]) == set(CHEXPERT_14)
    for lab in labels:  # blank -> None, positive -> 1, negative -> 0, uncertain -> -1
        assert lab["cardiomegaly"] == 1 and lab["pleural_effusion"] == UNCERTAIN
        assert lab["edema"] is None and lab["no_finding"] is None and lab["fracture"] == 0


def test_evaluate_with_chexbert_and_a_clear_message_without_it(tmp_path, capsys):
    from llm_cxr.cli import main

    weights, bert = _fake_chexbert(tmp_path)
    refs = _reports(8, 9)
    _write(tmp_path / "r.jsonl", [{"id": i, "report": r} for i, r in enumerate(refs)])
    res = reports.evaluate_predictions(tmp_path / "r.jsonl", tmp_path / "r.jsonl", tmp_path / "out", resamples=10,
                                       meteor=False, chexbert=(weights, bert))
    assert res["labeler"] == "chexbert" and res["per_class"]["uncertain_as_positive"]["cardiomegaly"]["f1"] == 1.0
    assert "CheXbert labeler" in (tmp_path / "out" / "metrics.md").read_text()
    rc = main(["evaluate", "--predictions", str(tmp_path / "r.jsonl"), "--references", str(tmp_path / "r.jsonl"),
               "--labeler", "chexbert", "--bert", str(bert), "--no-meteor", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "chexbert.pth" in capsys.readouterr().err  # no weights given: what to get, and where
