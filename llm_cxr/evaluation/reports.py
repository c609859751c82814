"""Score generated reports from any system against references: language metrics, clinical efficacy, error bars.

``evaluate_predictions`` scores a predictions file study by study into ``per_study.jsonl`` (appended as
it goes: a killed run resumes where it stopped and reuses every study already scored whose texts are
unchanged), then aggregates: BLEU-1..4, ROUGE-L, METEOR, CIDEr-D (:mod:`llm_cxr.evaluation.language`),
CheXpert-14 and 5-class clinical efficacy with both uncertainty treatments and laterality agreement
(:mod:`llm_cxr.evaluation.chexpert`), RadGraph F1 when its model is given (:mod:`llm_cxr.evaluation.radgraph`),
each with a bootstrap confidence interval over studies (:mod:`llm_cxr.evaluation.bootstrap`); with
``compare``, a second system on the same studies and the paired bootstrap of the differences. Writes
``metrics.json``, ``metrics.md`` and ``per_class_f1.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from llm_cxr.data.schema import CHEXPERT_14
from llm_cxr.errors import InputError, LLMCXRError, MetricUnavailable
from llm_cxr.evaluation import chexpert, language
from llm_cxr.evaluation.bootstrap import bootstrap_ci, paired_bootstrap
from llm_cxr.evaluation.radgraph import radgraph_scores
from llm_cxr.evaluation.report_files import Problems, match, read_references, read_reports, section_text
from llm_cxr.files import write_atomic

log = logging.getLogger(__name__)

SCORER_VERSION = 1  # bump when a per-study score changes meaning: stored studies are then rescored
HEADLINE = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider_d",
            "ce14_micro_f1", "ce14_macro_f1", "ce5_micro_f1", "ce5_macro_f1",
            "ce14_micro_f1_uneg", "ce5_micro_f1_uneg", "laterality_agreement",
            "radgraph_simple", "radgraph_partial", "radgraph_complete")
LABELS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L",
          "meteor": "METEOR", "cider_d": "CIDEr-D",
          "ce14_micro_f1": "CheXpert-14 micro-F1", "ce14_macro_f1": "CheXpert-14 macro-F1",
          "ce5_micro_f1": "5-class micro-F1", "ce5_macro_f1": "5-class macro-F1",
          "ce14_micro_f1_uneg": "CheXpert-14 micro-F1 (uncertain as negative)",
          "ce5_micro_f1_uneg": "5-class micro-F1 (uncertain as negative)",
          "laterality_agreement": "laterality agreement", "radgraph_simple": "RadGraph F1 simple (entities)",
          "radgraph_partial": "RadGraph F1 partial (entities, relation exists)",
          "radgraph_complete": "RadGraph F1 complete (entities and relations)"}


def _key(pred: str, ref: str, section: str, meteor: bool, labeler: str = "rules", radgraph: str | None = None) -> str:
    parts = [SCORER_VERSION, section, meteor, labeler, pred, ref] + ([radgraph] if radgraph else [])
    raw = json.dumps(parts)  # without RadGraph: the keys of earlier versions, so their records are reused
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _load_done(path: Path) -> dict[str, dict]:
    """Studies already scored; a line cut by a kill is dropped (and rewritten on this run)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(raw)
            done[rec["id"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def rules_labeler(texts: Sequence[str]) -> list[tuple[dict, dict]]:
    """The project's rule-based labeler: CheXpert labels and the sides findings are stated on."""
    return chexpert.label_texts(texts)


def chexbert_labeler(weights, bert, device: str = "cpu"):
    """CheXbert from local files (:mod:`llm_cxr.evaluation.chexbert`); it states no sides."""
    from llm_cxr.evaluation.chexbert import chexbert_labels, load_chexbert

    model, tok = load_chexbert(weights, bert, device)

    def label(texts: Sequence[str]) -> list[tuple[dict, dict]]:
        return [(labels, {}) for labels in chexbert_labels(texts, model, tok)]

    label.name = "chexbert"
    return label


def score_studies(ids: Sequence[str], preds: dict[str, str], refs: dict[str, str], path: Path,
                  section: str = "all", meteor: bool = True, progress: bool = False, labeler=None,
                  radgraph=None) -> list[dict]:
    """One record per id (cached in ``path``, JSONL, appended as each study is scored). ``labeler``: texts ->
    (CheXpert labels, sides) per text; default the rule-based one. ``radgraph``: texts -> RadGraph annotations
    (:mod:`llm_cxr.evaluation.radgraph`), to score RadGraph F1; None skips it."""
    from tqdm.auto import tqdm

    labeler = labeler or rules_labeler
    name = getattr(labeler, "name", "rules")
    rg_name = None if radgraph is None else getattr(radgraph, "name", "radgraph")
    done = _load_done(path)
    records, todo = {}, []
    for i in ids:
        k = _key(preds[i], refs[i], section, meteor, name, rg_name)
        if i in done and done[i].get("key") == k:
            records[i] = done[i]
        else:
            todo.append((i, k))
    kept = [records[i] for i in ids if i in records]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))  # without stale or partial lines; then append
    if todo:
        log.info("%s: %d studies to score, %d reused", path, len(todo), len(kept))
    with open(path, "a", encoding="utf-8") as f:
        for start in tqdm(range(0, len(todo), 64), desc="scoring", unit="batch", disable=not progress):
            batch = todo[start:start + 64]
            p = [section_text(preds[i], section) for i, _ in batch]
            r = [section_text(refs[i], section) for i, _ in batch]
            lab_p, lab_r = labeler(p), labeler(r)
            met = language.meteor_scores(p, r) if meteor else [None] * len(p)
            rg = radgraph_scores(p, r, radgraph) if radgraph is not None else [None] * len(p)
            for j, (i, k) in enumerate(batch):
                rec = {"id": i, "key": k, "bleu": language.bleu_stats(p[j], [r[j]]).tolist(),
                       "rouge_l": language.rouge_l(p[j], [r[j]]),
                       "meteor": None if met[j] is None else float(met[j]),
                       "pred_labels": lab_p[j][0], "ref_labels": lab_r[j][0],
                       "pred_sides": lab_p[j][1], "ref_sides": lab_r[j][1],
                       "radgraph": None if rg[j] is None else list(rg[j])}
                records[i] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
    return [records[i] for i in ids]


class Scored:
    """Per-study arrays of one system on a list of studies, and ``stat(idx)`` for any resample of them."""

    def __init__(self, records: list[dict], preds: Sequence[str], refs: Sequence[str], meteor: bool) -> None:
        self.n = len(records)
        self.bleu = np.asarray([r["bleu"] for r in records], dtype=np.float64)
        self.rouge = np.asarray([r["rouge_l"] for r in records], dtype=np.float64)
        self.meteor = np.asarray([r["meteor"] for r in records], dtype=np.float64) if meteor else None
        self.cider = np.asarray(language.cider_d_scores(list(preds), list(refs)), dtype=np.float64)
        pl, rl = [r["pred_labels"] for r in records], [r["ref_labels"] for r in records]
        self.counts = {name: chexpert.study_counts(pl, rl, CHEXPERT_14, u) for name, u in chexpert.UNCERTAIN_AS.items()}
        lat = [chexpert.laterality_counts(r["pred_sides"], r["ref_sides"]) for r in records]
        self.lat = np.asarray(lat, dtype=np.int64).reshape(-1, 2)
        rg = [r.get("radgraph") for r in records]  # simple, partial, complete per study, or None when not scored
        self.radgraph = np.asarray(rg, dtype=np.float64).reshape(-1, 3) if all(x is not None for x in rg) else None

    def stat(self, idx: np.ndarray) -> dict[str, float]:
        out = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), language.bleu_from_stats(self.bleu[idx].sum(0))))
        out["rouge_l"] = float(self.rouge[idx].mean())
        if self.meteor is not None:
            out["meteor"] = float(self.meteor[idx].mean())
        out["cider_d"] = float(self.cider[idx].mean())
        subsets = {"14": CHEXPERT_14, "5": chexpert.CHEXPERT_5}
        for name, suffix in (("uncertain_as_positive", ""), ("uncertain_as_negative", "_uneg")):
            s = chexpert.scores_from_counts(self.counts[name][idx].sum(0), CHEXPERT_14, subsets)
            for k in ("14", "5"):
                out[f"ce{k}_micro_f1{suffix}"] = s[k]["micro_f1"]
                out[f"ce{k}_macro_f1{suffix}"] = s[k]["macro_f1"]
        agree, compared = self.lat[idx].sum(0)
        out["laterality_agreement"] = float(agree / compared) if compared else float("nan")
        if self.radgraph is not None:
            for k, v in zip(("radgraph_simple", "radgraph_partial", "radgraph_complete"), self.radgraph[idx].mean(0)):
                out[k] = float(v)
        return out

    def per_class(self) -> dict[str, dict]:
        return {name: chexpert.scores_from_counts(c, CHEXPERT_14, {"14": CHEXPERT_14})["per_class"]
                for name, c in self.counts.items()}


def _meteor_unavailable() -> str | None:
    """Why METEOR cannot run here (its WordNet data missing), or None."""
    try:
        language.load_wordnet()
    except LLMCXRError as e:
        return str(e)
    return None


def _radgraph_annotator(radgraph, model_type: str | None, device: str) -> tuple[object, str | None]:
    """(annotator or None, why RadGraph F1 is skipped or None): a callable is used as it is, a folder loaded."""
    if radgraph is None or callable(radgraph):
        return radgraph, None
    from llm_cxr.evaluation.radgraph import load_radgraph

    try:
        return load_radgraph(radgraph, model_type, device), None
    except MetricUnavailable as e:
        log.warning("RadGraph F1 skipped: %s", e)
        return None, str(e)


def _system(pred_path: Path, refs: dict[str, str], out: Path, name: str, text_field: str | None, section: str,
            meteor: bool, progress: bool, labeler=None, radgraph=None
            ) -> tuple[dict[str, str], list[str], Problems, dict[str, dict]]:
    problems = Problems()
    preds = read_reports(pred_path, text_field, problems)
    ids = match(preds, refs, problems)
    for line in problems.lines():
        log.warning("%s: %s", pred_path, line)
    recs = score_studies(ids, preds, refs, out / f"{name}_per_study.jsonl", section, meteor, progress, labeler,
                         radgraph)
    return preds, ids, problems, {r["id"]: r for r in recs}


def evaluate_predictions(predictions: str | Path, references: str | Path, out: str | Path, split: str = "test",
                         compare: str | Path | None = None, resamples: int = 1000, seed: int = 0,
                         section: str = "all", text_field: str | None = None, meteor: bool | None = None,
                         names: tuple[str, str] = ("system", "baseline"), progress: bool = False,
                         chexbert: tuple | None = None, radgraph=None, radgraph_model: str | None = None,
                         device: str = "cpu") -> dict:
    """Score ``predictions`` (and ``compare``) against ``references``; write and return the results.

    ``chexbert``: (checkpoint, BERT folder) to read the reports with CheXbert instead of the rule-based labeler.
    ``radgraph``: a RadGraph model folder (``radgraph_model`` its type) or an annotator (texts -> annotations) to
    add RadGraph F1; when the folder or the package is missing, a warning says what to get and the rest is scored.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ref_problems = Problems()
    refs = read_references(references, split, text_field if not Path(references).is_dir() else None, ref_problems)
    if not refs:
        raise InputError(f"{references}: no reference reports")
    if meteor is not False:
        why = _meteor_unavailable()
        if why and meteor:
            raise LLMCXRError(why)
        if why:
            log.warning("METEOR skipped: %s", why)
        meteor = why is None
    labeler = chexbert_labeler(*chexbert) if chexbert else rules_labeler
    radgraph, rg_skipped = _radgraph_annotator(radgraph, radgraph_model, device)
    preds, ids, problems, recs = _system(Path(predictions), refs, out, names[0], text_field, section, meteor,
                                         progress, labeler, radgraph)
    if not preds:
        raise InputError(f"{predictions}: no prediction in the file (empty, or no readable row with an id)")
    if not ids:
        raise InputError(f"{predictions}: no id matches a reference id in {references}")
    text = lambda p, i: section_text(p[i], section)  # noqa: E731
    a = Scored([recs[i] for i in ids], [text(preds, i) for i in ids], [text(refs, i) for i in ids], meteor)
    result = {"predictions": str(predictions), "references": str(references), "split": split, "section": section,
              "n": len(ids), "coverage": len(ids) / len(refs), "resamples": resamples, "seed": seed,
              "metrics": bootstrap_ci(a.stat, a.n, resamples, seed), "per_class": a.per_class(),
              "problems": problems.to_dict(), "reference_problems": ref_problems.to_dict(),
              "names": list(names), "labeler": getattr(labeler, "name", "rules"),
              "radgraph": None if radgraph is None else getattr(radgraph, "name", "radgraph")}
    if rg_skipped:
        result["skipped"] = {"radgraph": rg_skipped}
    if compare is not None:
        result["comparison"] = _compare(Path(compare), refs, out, preds, ids, recs, names, text_field, section,
                                        meteor, resamples, seed, progress, labeler, radgraph)
    _write_outputs(out, result)
    return result


def _compare(path: Path, refs, out: Path, preds_a, ids_a, recs_a, names, text_field, section, meteor,
             resamples, seed, progress, labeler, radgraph) -> dict:
    preds_b, ids_b, problems_b, recs_b = _system(path, refs, out, names[1], text_field, section, meteor, progress,
                                                 labeler, radgraph)
    common = [i for i in ids_a if i in recs_b]
    if not common:
        raise InputError(f"{path}: no study in common with the predictions being compared")
    text = lambda p, i: section_text(p[i], section)  # noqa: E731
    r = [text(refs, i) for i in common]
    a = Scored([recs_a[i] for i in common], [text(preds_a, i) for i in common], r, meteor)
    b = Scored([recs_b[i] for i in common], [text(preds_b, i) for i in common], r, meteor)
    return {"predictions": str(path), "n": len(common), "problems": problems_b.to_dict(),
            "metrics": bootstrap_ci(b.stat, b.n, resamples, seed), "per_class": b.per_class(),
            "paired": paired_bootstrap(a.stat, b.stat, len(common), resamples, seed)}


def _fmt(v: float) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def markdown(result: dict) -> str:
    """The results as markdown tables: headline metrics with intervals, per-class F1, the comparison."""
    m, name = result["metrics"], result["names"][0]
    lines = [f"# Report metrics: {result['predictions']}", "",
             f"{result['n']} studies ({result['coverage']:.1%} of the references in {result['references']}, "
             f"split {result['split']}), section `{result['section']}`, clinical labels by the "
             f"{'CheXbert' if result.get('labeler') == 'chexbert' else 'rule-based'} labeler; 95% bootstrap intervals "
             f"over studies "
             f"({result['resamples']} resamples, seed {result['seed']})."
             + (f" RadGraph F1 with `{result['radgraph']}`." if result.get("radgraph") else ""), "",
             f"| metric | {name} | 95% CI |", "|---|---|---|"]
    lines += [f"| {LABELS[k]} | {_fmt(m[k]['value'])} | {_fmt(m[k]['low'])} - {_fmt(m[k]['high'])} |"
              for k in HEADLINE if k in m]
    pos, neg = result["per_class"]["uncertain_as_positive"], result["per_class"]["uncertain_as_negative"]
    lines += ["", "| class | support | precision | recall | F1 | F1 (uncertain as negative) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {pos[c]['support']} | {_fmt(pos[c]['precision'])} | {_fmt(pos[c]['recall'])} | "
              f"{_fmt(pos[c]['f1'])} | {_fmt(neg[c]['f1'])} |" for c in CHEXPERT_14]
    cmp = result.get("comparison")
    if cmp:
        other = result["names"][1]
        lines += ["", f"**{name} vs {other}** ({cmp['predictions']}), paired bootstrap on {cmp['n']} common studies:",
                  "", f"| metric | {name} | {other} | difference | 95% CI | p |", "|---|---|---|---|---|---|"]
        lines += [f"| {LABELS[k]} | {_fmt(d['a'])} | {_fmt(d['b'])} | {d['delta']:+.3f} | {_fmt(d['low'])} - "
                  f"{_fmt(d['high'])} | {d['p']:.3f} |" for k in HEADLINE if (d := cmp["paired"].get(k))]
    for what, why in result.get("skipped", {}).items():
        lines += ["", f"Not computed: {what} ({why})."]
    probs = {k: v["count"] for k, v in result["problems"].items() if v["count"]}
    if probs:
        lines += ["", "Not scored as given: " + ", ".join(f"{v} {k}" for k, v in probs.items())
                  + " (listed in metrics.json)."]
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, result: dict) -> None:
    from llm_cxr.evaluation.plots import per_class_f1_png

    write_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "metrics.md", markdown(result))
    systems = {result["names"][0]: result["per_class"]}
    if "comparison" in result:
        systems[result["names"][1]] = result["comparison"]["per_class"]
    png = per_class_f1_png(systems, CHEXPERT_14)
    if png is not None:
        write_atomic(out / "per_class_f1.png", png)

