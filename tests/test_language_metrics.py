"""Report language metrics (llm_cxr.evaluation.language): hand-computed values, agreement with the reference
implementations (sacrebleu, nltk, rouge-score, pycocoevalcap) on the same tokens, the local ``evaluate`` modules,
and METEOR's clear error when WordNet is missing."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from llm_cxr.data.synth import SynthConfig, sample_findings
from llm_cxr.data.synth_report import write_report
from llm_cxr.errors import ConfigError, InputError, MetricUnavailable
from llm_cxr.evaluation import language as L


@pytest.fixture(scope="module")
def wordnet():
    """The WordNet METEOR reads; the test is skipped where there is none."""
    if not L.meteor_available():
        pytest.skip("no WordNet for METEOR here (apt-get install wordnet-base)")
    return L.load_wordnet()


# ---- a corpus of report-like texts --------------------------------------------------------------

def _report(findings, rng) -> str:
    body, impression = write_report(findings, rng)
    return f"FINDINGS: {body}\nIMPRESSION: {impression}"


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[list[str]]]:
    """40 studies: predictions that paraphrase, truncate, copy, contradict or leave out the reference, and 1-3
    references per study (the first is the study's report, the others paraphrases of it)."""
    rng = np.random.default_rng(7)
    cfg = SynthConfig()
    preds, refs = [], []
    for i in range(40):
        findings = sample_findings(rng, cfg)
        ref = [_report(findings, rng) for _ in range(1 + i % 3)]
        kind = i % 6
        if kind == 0:
            pred = ref[0]
        elif kind == 1:
            pred = _report(sample_findings(rng, cfg), rng)  # another study's report
        elif kind == 2:
            pred = " ".join(ref[0].split()[: 3 + i % 7])  # cut short: brevity penalty
        elif kind == 3 and i % 4 == 3:
            pred = ""
        else:
            pred = _report(findings, rng)  # the same findings said differently
        preds.append(pred)
        refs.append(ref)
    preds[5] = "The heart is normal. Lungs are clear."  # short, hand-written ones
    preds[11] = "No acute cardiopulmonary process; no pleural effusion (left or right)."
    return preds, refs


def _joined(texts: list[str]) -> list[str]:
    """The reference implementations get exactly our tokens, joined by single spaces."""
    return [" ".join(L.tokenize(t)) for t in texts]


# ---- tokenisation ---------------------------------------------------------------------------------

def test_tokenize_follows_r2gen_cleaning():
    assert L.tokenize("1. Right pneumothorax, large. 2. Right basilar atelectasis.") == [
        "right", "pneumothorax", "large", "right", "basilar", "atelectasis"]
    text = "Heart size is NORMAL.\nNo effusion... 3.5 cm w/o change; right-sided - line (26 mm) [x] don't"
    assert L.tokenize(text) == ["heart", "size", "is", "normal", "no", "effusion", "35", "cm", "wo", "change",
                                "right-sided", "line", "26", "mm", "x", "dont"]
    assert L.tokenize("") == [] and L.tokenize(" . , ; ") == []


# ---- (1) hand-computed values ---------------------------------------------------------------------

def test_bleu_by_hand():
    # hyp "the heart is normal" (c = 4), ref "the heart size is normal" (r = 5)
    # 1-grams: the, heart, is, normal all in the ref -> 4/4; 2-grams: "the heart", "is normal" of 3 -> 2/3;
    # 3-grams: "the heart is", "heart is normal" -> 0/2. BP = exp(1 - 5/4) = exp(-0.25).
    # BLEU-1 = exp(-0.25) * 1, BLEU-2 = exp(-0.25) * sqrt(1 * 2/3), BLEU-3 = BLEU-4 = 0.
    stats = L.bleu_stats("The heart is normal.", ["The heart size is normal."])
    np.testing.assert_array_equal(stats, [4, 5, 4, 2, 0, 0, 4, 3, 2, 1])
    b = L.bleu_from_stats(stats)
    assert b[0] == pytest.approx(math.exp(-0.25), abs=1e-12)
    assert b[1] == pytest.approx(math.exp(-0.25) * math.sqrt(2 / 3), abs=1e-12)
    assert b[2:] == [0.0, 0.0]
    # clipping: "no no no effusion" has 3 x "no", the ref one -> 1-gram matches 1 + 1 = 2 of 4.
    # Closest reference length: c = 4, refs of 3 and 5 tokens are equally close -> the shorter, 3.
    stats = L.bleu_stats("no no no effusion", ["no effusion here", "no pleural effusion seen here"])
    assert stats[1] == 3 and stats[2] == 2
    # a corpus sums the rows: (4 + 4) words, r = 5 + 3 = 8 -> BP = 1; 1-grams (4 + 2)/8, 2-grams (2 + 1)/6
    corpus = L.corpus_bleu(["The heart is normal.", "no no no effusion"],
                           [["The heart size is normal."], ["no effusion here", "no pleural effusion seen here"]])
    assert corpus["bleu_1"] == pytest.approx(6 / 8, abs=1e-12)
    assert corpus["bleu_2"] == pytest.approx(math.sqrt(6 / 8 * 3 / 6), abs=1e-12)


def test_bleu_stats_sum_over_any_resample(corpus):
    preds, refs = corpus
    rows = L.corpus_bleu_stats(preds, refs)
    assert rows.shape == (len(preds), 10)
    assert L.bleu_from_stats(rows) == L.bleu_from_stats(rows.sum(0)) == list(L.corpus_bleu(preds, refs).values())
    idx = np.random.default_rng(0).integers(len(preds), size=len(preds))
    resampled = L.corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx])
    np.testing.assert_allclose(L.bleu_from_stats(rows[idx]), list(resampled.values()), atol=1e-12)
    with pytest.raises(InputError, match="max_order"):
        L.bleu_from_stats(rows, max_order=3)


def test_rouge_l_by_hand():
    # hyp "no acute cardiopulmonary process" (4), ref "no acute process is seen" (5): LCS "no acute process" = 3,
    # P = 3/4, R = 3/5. beta 1.2: (1 + 1.44) * 0.75 * 0.6 / (0.6 + 1.44 * 0.75) = 1.098 / 1.68; beta 1: 2PR/(P+R).
    hyp, ref = "No acute cardiopulmonary process.", "No acute process is seen."
    assert L.rouge_l(hyp, [ref]) == pytest.approx(1.098 / 1.68, abs=1e-12)
    assert L.rouge_l(hyp, [ref], beta=1.0) == pytest.approx(2 * 0.75 * 0.6 / 1.35, abs=1e-12)
    # several references: best precision and best recall, possibly from different references (coco-caption):
    # ref "no acute process" gives P = 3/4, R = 3/3; ref "acute process is seen" gives LCS 2: P 2/4, R 2/4.
    assert L.rouge_l(hyp, ["no acute process", "acute process is seen"], beta=1.0) == pytest.approx(
        2 * 0.75 * 1.0 / 1.75, abs=1e-12)
    assert L.rouge_l("", [ref]) == 0.0 and L.rouge_l(hyp, [""]) == 0.0


def test_lcs_bit_parallel_equals_dynamic_programme():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = [str(t) for t in rng.integers(0, 5, size=int(rng.integers(0, 30)))]
        b = [str(t) for t in rng.integers(0, 5, size=int(rng.integers(0, 30)))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = (table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1]
                               else max(table[i - 1][j], table[i][j - 1]))
        assert L._lcs_length(a, b) == table[-1][-1]


def test_cider_d_by_hand():
    # 3 studies, N = 3: A hyp = ref "no effusion"; B hyp "no pneumothorax seen", ref "no pneumothorax";
    # C hyp "", ref "clear lungs". Document frequencies (over reference sets): "no" 2, every other ref n-gram 1.
    # Weight of an n-gram = tf * (ln N - ln max(1, df)): "no" ln 1.5, all others ln 3 (df 0 or 1).
    # A: hyp vectors = ref vectors in orders 1 and 2 (cosine 1 each), orders 3, 4 empty (0); length (bigrams)
    #    1 vs 1, no penalty -> (1 + 1 + 0 + 0) / 4 * 10 = 5.
    # B: order 1: hyp (no: ln1.5, pneumothorax: ln3, seen: ln3), ref (no: ln1.5, pneumothorax: ln3):
    #    dot = ln1.5^2 + ln3^2 -> cos1 = sqrt(ln1.5^2 + ln3^2) / sqrt(ln1.5^2 + 2 ln3^2);
    #    order 2: hyp (no pneumothorax, pneumothorax seen), ref (no pneumothorax), all ln3 -> cos2 = 1/sqrt(2);
    #    order 3: the ref has none -> 0. Lengths 2 vs 1 bigrams: penalty exp(-1 / (2 * 6^2)).
    #    -> (cos1 + cos2) * exp(-1/72) / 4 * 10.  C: empty -> 0.
    a, b = math.log(1.5) ** 2, math.log(3) ** 2
    expected_b = (math.sqrt(a + b) / math.sqrt(a + 2 * b) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    scores = L.cider_d_scores(["No effusion.", "No pneumothorax seen.", ""],
                              ["No effusion.", "No pneumothorax.", "Clear lungs."])
    np.testing.assert_allclose(scores, [5.0, expected_b, 0.0], atol=1e-12)
    assert expected_b == pytest.approx(3.5415, abs=1e-4)


def test_meteor_by_hand(wordnet):
    # Identical, 4 words: P = R = 1, Fmean = 1, 1 chunk -> penalty 0.5 * (1/4)^3; score 1 - 0.0078125.
    # "lung is clear" vs "the lungs are clear": "clear" exact, "lung" ~ "lungs" by Porter stem: m = 2,
    # P = 2/3, R = 2/4, Fmean = PR / (0.9 P + 0.1 R) = (1/3) / 0.65; 2 chunks of 2 matches -> penalty 0.5.
    # "clear chest" vs "clear thorax": "chest" ~ "thorax" only through WordNet: m = 2 of 2, 1 chunk ->
    # 1 - 0.5 * (1/2)^3 = 0.9375 (0.25 without WordNet).
    scores = L.meteor_scores(["The lungs are clear.", "Lung is clear.", "Clear chest.", ""],
                             ["the lungs are clear", "The lungs are clear.", "Clear thorax.", "No effusion."])
    np.testing.assert_allclose(scores, [1 - 0.5 / 64, (1 / 3) / 0.65 * 0.5, 0.9375, 0.0], atol=1e-12)


def test_inputs_are_checked():
    with pytest.raises(InputError, match="2 predictions but 1 references"):
        L.corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(InputError, match="study 1 has no reference"):
        L.cider_d_scores(["a", "b"], [["a"], []])
    with pytest.raises(InputError, match="not a single string"):
        L.rouge_l_scores("no effusion", ["no effusion"])
    with pytest.raises(ConfigError, match="bleu, rouge_l, meteor, cider"):
        L.load_metric("blue")


def test_empty_predictions_score_zero():
    preds, refs = ["", "", None], ["No effusion.", ["Clear lungs.", "No pneumothorax."], "Normal heart."]
    assert L.corpus_bleu(preds, refs) == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0}
    assert L.rouge_l_scores(preds, refs).tolist() == [0.0] * 3
    assert L.cider_d_scores(preds, refs).tolist() == [0.0] * 3
    if L.meteor_available():
        assert L.meteor_scores(preds, refs).tolist() == [0.0] * 3


# ---- (2) agreement with reference implementations -------------------------------------------------

def test_bleu_matches_sacrebleu(corpus):
    """sacrebleu 2.x on our tokens: tokenize="none", smooth_method="none", effective_order=False (a zero precision
    gives 0, as here), force=True (the input is tokenised on purpose); references padded with None, which it skips."""
    sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu not installed (pip install sacrebleu)")
    preds, refs = corpus
    hyps = _joined(preds)
    width = max(len(r) for r in refs)
    streams = [[" ".join(L.tokenize(r[k])) if k < len(r) else None for r in refs] for k in range(width)]
    ours = L.corpus_bleu(preds, refs)
    for n in range(1, 5):
        bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", max_ngram_order=n,
                                      effective_order=False, force=True)
        assert ours[f"bleu_{n}"] == pytest.approx(bleu.corpus_score(hyps, streams).score / 100, abs=1e-6)
    assert 0.05 < ours["bleu_4"] < ours["bleu_1"] < 1


def test_bleu_matches_nltk(corpus):
    """nltk's corpus_bleu, no smoothing. It floors each study's n-gram count at 1 (modified_precision), unlike
    BLEU's definition, sacrebleu and coco-caption, so the comparison leaves out predictions of under 4 tokens."""
    bleu_score = pytest.importorskip("nltk.translate.bleu_score", reason="nltk not installed (pip install nltk)")
    keep = [i for i, p in enumerate(corpus[0]) if len(L.tokenize(p)) >= 4]
    preds, refs = [corpus[0][i] for i in keep], [corpus[1][i] for i in keep]
    assert len(keep) >= 30
    ours = L.corpus_bleu(preds, refs)
    theirs = bleu_score.corpus_bleu([[L.tokenize(r) for r in rs] for rs in refs], [L.tokenize(p) for p in preds],
                                    weights=[(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4])
    np.testing.assert_allclose(list(ours.values()), theirs, atol=1e-6)


def test_rouge_l_matches_rouge_score(corpus):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    preds, refs = corpus
    first = [r[0] for r in refs]  # rouge-score's multi-reference rule differs; one reference each
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    theirs = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(_joined(preds), _joined(first))]
    np.testing.assert_allclose(L.rouge_l_scores(preds, first, beta=1.0), theirs, atol=1e-6)


def _coco(corpus):
    preds, refs = corpus
    return ({i: [" ".join(L.tokenize(r)) for r in rs] for i, rs in enumerate(refs)},
            {i: [h] for i, h in enumerate(_joined(preds))})


def test_bleu_rouge_cider_match_pycocoevalcap(corpus):
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (pip install pycocoevalcap)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = corpus
    gts, res = _coco(corpus)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    np.testing.assert_allclose(list(L.corpus_bleu(preds, refs).values()), bleu, atol=1e-6)
    _, rouge = Rouge().compute_score(gts, res)
    np.testing.assert_allclose(L.rouge_l_scores(preds, refs), rouge, atol=1e-6)
    _, cider = Cider().compute_score(gts, res)
    ours = L.cider_d_scores(preds, refs)
    np.testing.assert_allclose(ours, cider, atol=1e-6)
    assert ours.max() > 1.0  # copies score high, so the comparison is not all zeros


def test_meteor_matches_nltk(corpus, wordnet):
    from nltk.translate.meteor_score import meteor_score

    preds, refs = corpus
    theirs = [meteor_score([L.tokenize(r) for r in rs], L.tokenize(p), wordnet=wordnet) for p, rs in zip(preds, refs)]
    ours = L.meteor_scores(preds, refs)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert 0 < ours.mean() < 1


# ---- (3) the Hugging Face `evaluate` modules, loaded from their folders -------------------------

@pytest.mark.parametrize("name", L.METRIC_NAMES)
def test_evaluate_modules_give_the_core_numbers(name, corpus):
    pytest.importorskip("evaluate")
    if name == "meteor" and not L.meteor_available():
        pytest.skip("no WordNet for METEOR here (apt-get install wordnet-base)")
    preds, refs = corpus
    first = [r[0] for r in refs]
    metric = L.load_metric(name)
    for references in (refs, first):  # several references per study, and one string each
        got = metric.compute(predictions=preds, references=references)
        if name == "bleu":
            want = L.corpus_bleu(preds, references)
        else:
            core = {"rouge_l": L.rouge_l_scores, "cider": L.cider_d_scores, "meteor": L.meteor_scores}[name]
            want = {name: float(np.mean(core(preds, references)))}
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-12)
    assert "Tokenisation" in metric.description and metric.citation


def test_metric_folders_are_package_data():
    for name in L.METRIC_NAMES:
        assert (L.metric_path(name) / f"{name}.py").is_file()
    # a wheel ships hf_metrics/*/*.py only through pyproject's package-data (they are not packages)
    pyproject = (L.HF_METRICS_DIR.parents[2] / "pyproject.toml").read_text()
    assert '"llm_cxr.evaluation" = ["hf_metrics/*/*.py"]' in pyproject


# ---- (4) METEOR without WordNet or nltk: a project error that says what to install ---------------

def test_meteor_without_wordnet_names_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("nltk")
    monkeypatch.setenv(L.WORDNET_ENV, str(tmp_path))  # an empty folder where WordNet should be
    assert not L.meteor_available()
    with pytest.raises(MetricUnavailable, match="apt-get install wordnet-base") as err:
        L.meteor_scores(["clear lungs"], ["lungs are clear"])
    assert str(tmp_path) in str(err.value) and "data.noun" in str(err.value)


def test_meteor_without_nltk_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk now raises ImportError
    with pytest.raises(MetricUnavailable, match="pip install nltk"):
        L.meteor_scores(["clear lungs"], ["lungs are clear"])
