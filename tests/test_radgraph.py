"""RadGraph F1: the three reward levels by hand and against the radgraph package, the annotator from a local
folder (a tiny random model in the package's layout: the real weights are the user's), and the evaluate path."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from llm_cxr.errors import MetricUnavailable
from llm_cxr.evaluation import radgraph as rg
from llm_cxr.evaluation import reports


def _ann(*entities) -> dict:
    """Entities as (tokens, label, [(relation, target id)]), with ids "1", "2", ... as the package numbers them."""
    return {"entities": {str(i + 1): {"tokens": t, "label": lab, "relations": [list(r) for r in rels]}
                         for i, (t, lab, rels) in enumerate(entities)}}


HYP = _ann(("Heart", "ANAT-DP", []), ("enlarged", "OBS-DP", [("located_at", "1"), ("modify", "3")]),
           ("effusion", "OBS-DA", [("located_at", "4")]), ("left", "ANAT-DP", []))
REF = _ann(("heart", "ANAT-DP", []), ("enlarged", "OBS-DP", [("located_at", "1")]), ("effusion", "OBS-DA", []),
           ("pneumothorax", "OBS-DA", [("located_at", "5")]), ("left", "ANAT-DP", []))


def test_three_levels_by_hand():
    s = rg.radgraph_f1(HYP, REF)
    # simple: (tokens, label); 'Heart' != 'heart' (case kept): enlarged, effusion, left match: P 3/4, R 3/5
    assert s.simple == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))  # 2/3
    # partial: enlarged (has relations in both) and left match; effusion has one only in HYP: P 2/4, R 2/5
    assert s.partial == pytest.approx(4 / 9)
    # complete: one item per relation, lower-cased: (enlarged, located_at, heart) and left match; HYP has 5
    # items (enlarged's two relations), REF 5: P = R = 2/5
    assert s.complete == pytest.approx(2 / 5)
    assert rg.radgraph_f1(REF, REF) == (1.0, 1.0, 1.0)
    assert rg.radgraph_f1(REF, HYP) == pytest.approx(tuple(s))  # F1 is symmetric


def test_duplicates_count_once_and_no_entities_scores_zero():
    once = _ann(("effusion", "OBS-DA", []))
    twice = _ann(("effusion", "OBS-DA", []), ("effusion", "OBS-DA", []))
    assert rg.radgraph_f1(twice, once) == (1.0, 1.0, 1.0)
    assert rg.radgraph_f1(_ann(), REF) == rg.ZERO and rg.radgraph_f1(REF, {"entities": {}}) == rg.ZERO
    # a relation to an entity the annotation lacks is dropped: the entity counts as having none
    dangling = _ann(("effusion", "OBS-DA", [("located_at", "9")]))
    assert rg.radgraph_f1(dangling, once) == (1.0, 1.0, 1.0)


def test_scores_skip_empty_reports_and_annotate_both_sides_at_once():
    calls = []

    def annotator(texts):
        calls.append(list(texts))
        return [REF if "same" in t else HYP for t in texts]

    got = rg.radgraph_scores(["same", "", "other", "same"], ["same", "same", "same", "  "], annotator)
    assert calls == [["same", "other", "same", "same"]]  # empty and blank texts are not annotated
    assert got[0] == (1.0, 1.0, 1.0) and got[1] == rg.ZERO and got[3] == rg.ZERO
    assert got[2] == pytest.approx(tuple(rg.radgraph_f1(HYP, REF)))
    assert rg.mean_scores(got).simple == pytest.approx((1 + got[2].simple) / 4)  # empty reports count, at 0
    with pytest.raises(ValueError, match="annotations"):
        rg.radgraph_scores(["a"], ["b"], lambda texts: [])


def _random_annotation(rng) -> dict:
    words = ["heart", "Heart", "effusion", "left", "Left", "lung", "opacity", "enlarged"]
    labels = ["ANAT-DP", "OBS-DP", "OBS-DA", "OBS-U"]
    n = int(rng.integers(0, 6))
    ents = []
    for _ in range(n):
        rels = [(str(rng.choice(["located_at", "modify", "suggestive_of"])), str(int(rng.integers(1, n + 1))))
                for _ in range(int(rng.integers(0, 3)))]
        ents.append((str(rng.choice(words)), str(rng.choice(labels)), rels))
    return _ann(*ents)


def test_agrees_with_the_radgraph_package():
    with warnings.catch_warnings():  # the package sets a warning filter on import
        rewards = pytest.importorskip("radgraph.rewards")
    rng = np.random.default_rng(0)
    pairs = [(HYP, REF), (REF, HYP), (_ann(), REF)] + [(_random_annotation(rng), _random_annotation(rng))
                                                         for _ in range(300)]
    for h, r in pairs:
        assert tuple(rg.radgraph_f1(h, r)) == pytest.approx(rewards.compute_reward(h, r, "all"), abs=1e-12)


def test_bert_snapshot_reads_the_local_cache(tmp_path):
    repo = tmp_path / "cache" / "models--org--tiny-bert"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert rg.bert_snapshot("org/tiny-bert", tmp_path / "cache") == repo / "snapshots" / "abc"
    assert rg.bert_snapshot("org/other-bert", tmp_path / "cache") is None
    assert rg.bert_snapshot(str(tmp_path), tmp_path / "cache") == tmp_path  # a folder is its own snapshot


def _config(bert: str) -> dict:
    return {"dataset_reader": {"type": "dygie", "max_span_width": 1,
                               "token_indexers": {"bert": {"type": "pretrained_transformer_mismatched",
                                                           "model_name": bert, "max_length": 64}}},
            "model": {"type": "dygie", "initializer": {}, "module_initializer": {},
                      "embedder": {"token_embedders": {"bert": {"type": "pretrained_transformer_mismatched",
                                                                "model_name": bert, "max_length": 64}}},
                      "feature_size": 4, "max_span_width": 1, "target_task": "ner",
                      "feedforward_params": {"num_layers": 1, "hidden_dims": 8, "dropout": 0.0},
                      "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
                      "modules": {"ner": {}, "coref": {"spans_per_word": 0.3, "max_antecedents": 2},
                                  "relation": {"spans_per_word": 0.5},
                                  "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                             "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}}}


def _model_folder(folder, bert: str):
    """A RadGraph folder laid out as radgraph.tar.gz extracts (config.json, vocabulary/), weights not yet saved."""
    (folder / "vocabulary").mkdir(parents=True)
    (folder / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (folder / "vocabulary" / "radgraph__ner_labels.txt").write_text("\nOBS-DP\nANAT-DP\n")  # "" = no entity
    (folder / "vocabulary" / "radgraph__relation_labels.txt").write_text("located_at\nmodify\n")
    (folder / "config.json").write_text(json.dumps(_config(bert)))
    return folder


def test_clear_messages_when_something_is_missing(tmp_path, monkeypatch):
    with pytest.raises(MetricUnavailable, match="StanfordAIMI/RRG_scorers.*radgraph"):
        rg.load_radgraph(None)
    folder = _model_folder(tmp_path / "radgraph", "org/not-cached-bert")
    with pytest.raises(MetricUnavailable, match="no weights.th.*pip install"):
        rg.load_radgraph(folder)
    (folder / "weights.th").write_bytes(b"")
    with pytest.raises(MetricUnavailable, match="org/not-cached-bert.*huggingface-cli download org/not-cached-bert"):
        rg.load_radgraph(folder, cache_dir=tmp_path / "empty-cache")
    (folder / "config.json").write_text(json.dumps(_config(str(tmp_path))))  # a BERT folder that exists
    monkeypatch.setitem(sys.modules, "radgraph", None)  # the package not installed
    with pytest.raises(MetricUnavailable, match="pip install"):
        rg.load_radgraph(folder)
    with pytest.raises(MetricUnavailable, match="unknown RadGraph model type"):
        rg.load_radgraph(folder, model_type="echograph")


# --- the evaluate path with an injected annotator ---------------------------------------------------------------

LEXICON = {"heart": "ANAT-DP", "left": "ANAT-DP", "right": "ANAT-DP", "enlarged": "OBS-DP", "effusion": "OBS-DA",
           "pneumothorax": "OBS-DA"}


def word_annotator(texts):
    """Each lexicon word an entity; an observation is located at the report's first anatomy word, if any."""
    out = []
    for t in texts:
        words = [w.strip(".,").lower() for w in t.split() if w.strip(".,").lower() in LEXICON]
        anat = next((str(i + 1) for i, w in enumerate(words) if LEXICON[w].startswith("ANAT")), None)
        out.append(_ann(*[(w, LEXICON[w], [("located_at", anat)] if anat and LEXICON[w].startswith("OBS") else [])
                          for w in words]))
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_with_an_injected_annotator_and_compare(tmp_path):
    refs = ["Heart enlarged.", "Left effusion.", "No pneumothorax."]
    _write(tmp_path / "refs.jsonl", [{"id": i, "report": r} for i, r in enumerate(refs)])
    _write(tmp_path / "preds.jsonl", [{"id": 0, "report": "Heart enlarged."}, {"id": 1, "report": "Right effusion."},
                                      {"id": 2, "report": ""}])
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return word_annotator(texts)

    counting.name = "words"
    res = reports.evaluate_predictions(tmp_path / "preds.jsonl", tmp_path / "refs.jsonl", tmp_path / "out",
                                       compare=tmp_path / "refs.jsonl", resamples=50, meteor=False, radgraph=counting)
    m = res["metrics"]
    # per study: identical (1, 1, 1); right vs left effusion (1/2, 1/2, 0); empty prediction (0, 0, 0)
    assert m["radgraph_simple"]["value"] == pytest.approx(0.5)
    assert m["radgraph_partial"]["value"] == pytest.approx(0.5)
    assert m["radgraph_complete"]["value"] == pytest.approx(1 / 3)
    assert all(m[k]["low"] <= m[k]["value"] <= m[k]["high"] for k in ("radgraph_simple", "radgraph_complete"))
    paired = res["comparison"]["paired"]["radgraph_complete"]  # the references against themselves score 1
    assert paired["b"] == 1.0 and paired["delta"] == pytest.approx(-2 / 3)
    assert res["radgraph"] == "words" and "skipped" not in res
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "RadGraph F1 complete" in md and "RadGraph F1 with `words`" in md
    rec = json.loads((tmp_path / "out" / "system_per_study.jsonl").read_text().splitlines()[1])
    assert rec["radgraph"] == [0.5, 0.5, 0.0]
    # resumed: nothing annotated again; without RadGraph the studies are rescored and no RadGraph metric remains
    n = len(calls)
    reports.evaluate_predictions(tmp_path / "preds.jsonl", tmp_path / "refs.jsonl", tmp_path / "out",
                                 resamples=5, meteor=False, radgraph=counting)
    assert len(calls) == n
    res = reports.evaluate_predictions(tmp_path / "preds.jsonl", tmp_path / "refs.jsonl", tmp_path / "out",
                                       resamples=5, meteor=False)
    assert not any(k.startswith("radgraph") for k in res["metrics"]) and res["radgraph"] is None


def test_cli_goes_on_without_radgraph_and_says_what_to_get(tmp_path, capsys):
    from llm_cxr.cli import main

    _write(tmp_path / "refs.jsonl", [{"id": 0, "report": "Heart enlarged."}, {"id": 1, "report": "Left effusion."}])
    rc = main(["-q", "evaluate", "--predictions", str(tmp_path / "refs.jsonl"), "--references",
               str(tmp_path / "refs.jsonl"), "--radgraph", str(tmp_path / "nowhere"), "--no-meteor",
               "--resamples", "5", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0 and "BLEU-4" in out and "Traceback" not in err
    assert "radgraph not computed" in err and "StanfordAIMI/RRG_scorers" in err
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "config.json" in res["skipped"]["radgraph"] and "radgraph_simple" not in res["metrics"]


# --- the package's model from a local folder (a tiny random one) ------------------------------------------------


def _tiny_radgraph(tmp_path):
    """A tiny BERT and a DyGIE on it whose entity scorer calls every one-token span OBS-DP and whose relation
    scorer finds none: its annotations are known without trained weights."""
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie
    from transformers import BertConfig, BertModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "1", "2", "heart", "is", "enlarged", "no",
             "pleural", "effusion", "."]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(bert)
    folder = _model_folder(tmp_path / "models" / "radgraph", str(bert))
    spec = _config(str(bert))["model"]
    for k in ("type", "embedder", "initializer", "module_initializer"):
        del spec[k]
    with rg.transformers_compat():
        embedder = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(bert), max_length=64)
    model = dygie.DyGIE(vocab=Vocabulary.from_files(str(folder / "vocabulary")),
                        embedder=text_field_embedders.BasicTextFieldEmbedder({"bert": embedder}), **spec)
    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith("_ner._ner_scorers") and ".1._module." in k:
                v.copy_(torch.tensor([10.0, -10.0]) if k.endswith("bias") else torch.zeros_like(v))
            if k.startswith("_relation._relation_scorers"):
                v.fill_(-10.0) if k.endswith("bias") else v.zero_()
    torch.save(state, folder / "weights.th")
    return folder


def test_load_radgraph_runs_the_package_model_offline(tmp_path, capsys):
    with warnings.catch_warnings():
        pytest.importorskip("radgraph")
    from transformers import PreTrainedTokenizerBase

    from llm_cxr.cli import main

    lent = hasattr(PreTrainedTokenizerBase, "encode_plus")
    folder = _tiny_radgraph(tmp_path)
    annotate = rg.load_radgraph(folder)
    assert annotate.name == "radgraph:radgraph"
    ann = annotate(["Heart is enlarged.", "no effusion"])
    assert [[e["tokens"] for e in a["entities"].values()] for a in ann] == [["Heart", "is", "enlarged", "."],
                                                                            ["no", "effusion"]]
    assert {e["label"] for a in ann for e in a["entities"].values()} == {"OBS-DP"}
    # {Heart, is, enlarged, .} vs {heart, enlarged}: one match, P 1/4, R 1/2
    assert rg.radgraph_scores(["Heart is enlarged."], ["heart enlarged"], annotate)[0].simple == pytest.approx(1 / 3)
    assert hasattr(PreTrainedTokenizerBase, "encode_plus") == lent  # transformers 5's tokenizers lent it only inside
    capsys.readouterr()
    _write(tmp_path / "refs.jsonl", [{"id": 0, "report": "Heart is enlarged."}, {"id": 1, "report": "no effusion"}])
    _write(tmp_path / "preds.jsonl", [{"id": 0, "report": "heart enlarged"}, {"id": 1, "report": "no effusion"}])
    rc = main(["-q", "evaluate", "--predictions", str(tmp_path / "preds.jsonl"), "--references",
               str(tmp_path / "refs.jsonl"), "--radgraph", str(folder), "--no-meteor", "--resamples", "5",
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "Using device" not in out and out.startswith("# Report metrics")
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert res["metrics"]["radgraph_simple"]["value"] == pytest.approx((1 / 3 + 1) / 2)
