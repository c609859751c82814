"""Report language metrics of the radiology-report-generation literature: BLEU-1..4, ROUGE-L, METEOR, CIDEr-D.

R2Gen (Chen et al., EMNLP 2020) and the many papers that reuse its evaluation code report these with the
coco-caption scorers (Chen et al., "Microsoft COCO Captions", arXiv:1504.00325; ``pycocoevalcap``):

* BLEU-n (Papineni et al., ACL 2002): corpus BLEU, uniform weights over orders 1..n, clipped n-gram matches,
  the closest reference length (ties go to the shorter, as coco-caption and sacrebleu do), brevity penalty
  ``exp(1 - r/c)`` when ``c < r``, no smoothing (a corpus with no match of some order scores 0 from that order on).
* ROUGE-L (Lin, "ROUGE", ACL workshop 2004): per study the longest common subsequence with each reference, the
  best precision and the best recall over the references, ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``
  (coco-caption); ``beta=1`` gives ``rouge-score``'s rougeL F-measure for one reference. Corpus score: the mean.
* CIDEr-D (Vedantam et al., CVPR 2015) exactly as ``pycocoevalcap.cider``: tf-idf weighted 1..4-gram vectors,
  document frequencies from the reference sets of the evaluated corpus (so the score of a study depends on the
  corpus it is scored in), the hypothesis weights clipped by the reference weights, a Gaussian penalty
  ``exp(-d^2 / (2 * 6^2))`` on the length difference ``d`` (coco-caption counts length as the number of bigrams),
  x10, mean over n and over references. Corpus score: the mean.
* METEOR (Banerjee & Lavie, ACL workshop 2005) as ``nltk.translate.meteor_score`` computes it (exact, Porter-stem
  and WordNet-synonym matches, the last on the stems the stem stage leaves: "chest" ~ "thorax" counts, "big" ~
  "large" does not; alpha 0.9, beta 3, gamma 0.5), max over references, corpus score the mean. This is
  *not* the Java METEOR 1.5 of coco-caption (which adds paraphrase tables): its numbers differ and are not
  comparable with papers that used it; say which one a table reports. WordNet is found offline, see
  :func:`load_wordnet`.

Tokenisation (:func:`tokenize`, the same for every metric and for predictions and references) follows R2Gen's
report cleaning (``clean_report_mimic_cxr``) except that its sentence periods are dropped instead of kept as
``.`` tokens:

1. whitespace runs become one space and runs of periods one period;
2. numbered-list markers go as R2Gen removes them: ``"1. "`` is deleted, ``". N. "`` and ``" N. "`` become
   ``". "`` for N in 2..5;
3. lowercase;
4. these characters are deleted (not replaced by a space, so ``"3.5"`` -> ``"35"``, ``"w/o"`` -> ``"wo"``):
   ``" / \\ '`` and R2Gen's class ``. , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { }`` (its ``:-\\[`` is a range);
   hyphens stay (``"right-sided"`` is one token);
5. split on whitespace, and drop tokens with no letter or digit left (a lone ``-``).

Each study may have one reference (a string) or several (a list of strings). An empty prediction scores 0.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from llm_cxr.errors import ConfigError, InputError, MetricUnavailable

log = logging.getLogger(__name__)

References = Union[Sequence[str], Sequence[Sequence[str]]]
TOKENIZATION = (
    "Tokenisation (llm_cxr.evaluation.language.tokenize): R2Gen's report cleaning without its period tokens: "
    "whitespace and period runs collapsed; list markers '1. ' deleted and '. N. ' / ' N. ' (N = 2..5) made '. '; "
    "lowercase; the characters \" / \\ ' . , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { } deleted (hyphens kept); split "
    "on whitespace; tokens with no letter or digit dropped."
)
METRIC_NAMES = ("bleu", "rouge_l", "meteor", "cider")
HF_METRICS_DIR = Path(__file__).resolve().parent / "hf_metrics"

# ---- tokenisation ------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")
_PERIODS = re.compile(r"\.{2,}")
# R2Gen: report_cleaner's list-marker replacements, in its order.
_LIST_MARKERS = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                 (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))
# R2Gen: sent_cleaner's deletions ('"', '/', '\\', "'" and the class [.,?;*!%^&_+():-\[\]{}], range spelt out).
_DELETED = re.compile(r"""["/\\'.,?;*!%^&_+():<=>@\[\]{}]""")


def tokenize(text: str) -> list[str]:
    """The tokens every metric here scores (see the module docstring for the rules)."""
    text = _PERIODS.sub(".", _WHITESPACE.sub(" ", text))
    for old, new in _LIST_MARKERS:
        text = text.replace(old, new)
    tokens = _DELETED.sub("", text.lower()).split()
    return [t for t in tokens if any(ch.isalnum() for ch in t)]


def _study_references(refs: str | Sequence[str], i: int) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    out = list(refs)
    if not out:
        raise InputError(f"study {i} has no reference: give at least one reference text per study")
    for r in out:
        if not isinstance(r, str):
            raise InputError(f"study {i}: a reference must be a string, got {type(r).__name__}")
    return out


def _prediction(p: str | None, i: int) -> str:
    if p is None:
        return ""
    if not isinstance(p, str):
        raise InputError(f"prediction {i} must be a string, got {type(p).__name__}")
    return p


def _tokenized_corpus(predictions: Sequence[str], references: References
                      ) -> tuple[list[list[str]], list[list[list[str]]]]:
    """(hypothesis tokens per study, reference token lists per study), checked for matching lengths."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise InputError("predictions and references must be lists (one item per study), not a single string")
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise InputError(f"{len(preds)} predictions but {len(refs)} references: give one reference (a string) "
                         "or a list of references for every prediction")
    hyps = [tokenize(_prediction(p, i)) for i, p in enumerate(preds)]
    return hyps, [[tokenize(r) for r in _study_references(x, i)] for i, x in enumerate(refs)]


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the 1..n-grams of ``tokens`` (tuples as keys)."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


# ---- BLEU ---------------------------------------------------------------------------------------

def _bleu_stats_tokens(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_order: int) -> np.ndarray:
    c = len(hyp)
    # closest reference length, ties to the shorter (coco-caption's min over (|l - c|, l); sacrebleu alike)
    r = min((abs(len(ref) - c), len(ref)) for ref in refs)[1]
    hyp_counts = _ngram_counts(hyp, max_order)
    max_ref: Counter = Counter()
    for ref in refs:
        max_ref |= _ngram_counts(ref, max_order)  # element-wise max: clipping by the most generous reference
    stats = np.zeros(2 + 2 * max_order)  # (hyp length, ref length, matches per order, totals per order)
    stats[0], stats[1] = c, r
    for gram, count in hyp_counts.items():
        stats[1 + len(gram)] += min(count, max_ref[gram])
    for k in range(1, max_order + 1):
        stats[1 + max_order + k] = max(c - k + 1, 0)
    return stats


def bleu_stats(prediction: str, references: Sequence[str], max_order: int = 4) -> np.ndarray:
    """Sufficient statistics of one study for corpus BLEU: a row that sums over any set of studies.

    ``[hypothesis length, closest reference length, clipped matches of order 1..max_order, n-grams of order
    1..max_order in the hypothesis]`` (length ``2 + 2 * max_order``). Feed the sum to :func:`bleu_from_stats`.
    """
    refs = [tokenize(r) for r in _study_references(references, 0)]
    return _bleu_stats_tokens(tokenize(_prediction(prediction, 0)), refs, max_order)


def corpus_bleu_stats(predictions: Sequence[str], references: References, max_order: int = 4) -> np.ndarray:
    """:func:`bleu_stats` of every study, ``(N, 2 + 2 * max_order)``: resample rows, sum, get BLEU."""
    hyps, refs = _tokenized_corpus(predictions, references)
    rows = [_bleu_stats_tokens(h, r, max_order) for h, r in zip(hyps, refs)]
    return np.stack(rows) if rows else np.zeros((0, 2 + 2 * max_order))


def bleu_from_stats(stats: np.ndarray, max_order: int = 4) -> list[float]:
    """Corpus BLEU-1..max_order from summed :func:`bleu_stats` (a 2-D array is summed over its rows first)."""
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim == 2:
        stats = stats.sum(axis=0)
    if stats.shape != (2 + 2 * max_order,):
        raise InputError(f"BLEU statistics of shape {stats.shape} do not fit max_order={max_order}: "
                         f"expected {2 + 2 * max_order} columns, as bleu_stats(..., max_order={max_order}) gives")
    c, r = float(stats[0]), float(stats[1])
    matches, totals = stats[2:2 + max_order], stats[2 + max_order:]
    if c == 0:
        return [0.0] * max_order
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    scores, log_sum = [], 0.0
    for k in range(max_order):
        if log_sum == -math.inf or matches[k] == 0:
            log_sum = -math.inf  # no smoothing: a zero precision zeroes this and every higher order
            scores.append(0.0)
            continue
        log_sum += math.log(matches[k] / totals[k])
        scores.append(brevity * math.exp(log_sum / (k + 1)))
    return scores


def corpus_bleu(predictions: Sequence[str], references: References, max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_order as ``{"bleu_1": ..., ...}``."""
    stats = corpus_bleu_stats(predictions, references, max_order)
    return {f"bleu_{k + 1}": s for k, s in enumerate(bleu_from_stats(stats, max_order))}


# ---- ROUGE-L ------------------------------------------------------------------------------------

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Crochemore et al. 2001).

    Bit i of ``v`` is 0 where row i of the dynamic programme steps up; one big-integer update per token of ``b``
    gives the same length as the O(len(a) * len(b)) table, much faster in Python.
    """
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for i, tok in enumerate(a):
        positions[tok] = positions.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & positions.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _rouge_l_tokens(hyp: Sequence[str], refs: Sequence[Sequence[str]], beta: float) -> float:
    if not hyp:
        return 0.0
    lcs = [_lcs_length(ref, hyp) for ref in refs]
    precision = max(m / len(hyp) for m in lcs)
    recall = max((m / len(ref) if ref else 0.0) for m, ref in zip(lcs, refs))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def rouge_l(prediction: str, references: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L of one study as coco-caption computes it (best precision and best recall over the references)."""
    refs = [tokenize(r) for r in _study_references(references, 0)]
    return _rouge_l_tokens(tokenize(_prediction(prediction, 0)), refs, beta)


def rouge_l_scores(predictions: Sequence[str], references: References, beta: float = 1.2) -> np.ndarray:
    """:func:`rouge_l` of every study, ``(N,)``; the corpus ROUGE-L is their mean."""
    hyps, refs = _tokenized_corpus(predictions, references)
    return np.array([_rouge_l_tokens(h, r, beta) for h, r in zip(hyps, refs)], dtype=np.float64)


# ---- CIDEr-D ------------------------------------------------------------------------------------

def _tfidf(counts: Counter, doc_freq: Counter, log_n_docs: float, n: int) -> tuple[list[dict], list[float], int]:
    """coco-caption's counts2vec: tf-idf weights per order, their norms, and the 'length' (number of bigrams)."""
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        w = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
        vec[k][gram] = w
        norm[k] += w * w
        if k == 1:  # coco-caption's length: bigram count (its `if n == 1`), kept for identical scores
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(hyp: tuple, ref: tuple, n: int, sigma: float) -> float:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
    total = 0.0
    for k in range(n):
        val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
            val /= nh[k] * nr[k]
        total += val * penalty
    return total


def cider_d_scores(predictions: Sequence[str], references: References, n: int = 4, sigma: float = 6.0
                   ) -> np.ndarray:
    """Per-study CIDEr-D, ``(N,)``, exactly as ``pycocoevalcap.cider.Cider``; the corpus CIDEr-D is the mean.

    Document frequencies come from the reference sets of these studies, so score a whole test set at once.
    """
    hyps, refs = _tokenized_corpus(predictions, references)
    ref_counts = [[_ngram_counts(r, n) for r in rs] for rs in refs]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_n_docs = math.log(float(len(refs))) if refs else 0.0
    scores = np.zeros(len(hyps))
    for i, (hyp, counts) in enumerate(zip(hyps, ref_counts)):
        h = _tfidf(_ngram_counts(hyp, n), doc_freq, log_n_docs, n)
        total = sum(_cider_sim(h, _tfidf(c, doc_freq, log_n_docs, n), n, sigma) for c in counts)
        scores[i] = total / n / len(counts) * 10.0
    return scores


# ---- METEOR -------------------------------------------------------------------------------------

WORDNET_ENV = "LLM_CXR_WORDNET"
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
_WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")) + (
    "noun.exc", "verb.exc", "adj.exc", "adv.exc")
# WordNet 3.0's lexicographer files (lexnames(5WN)): Debian's wordnet-base leaves the file out, nltk reads it.
_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_INSTALL_WORDNET = (
    "METEOR needs the WordNet 3.0 database: install Debian's `wordnet-base` (apt-get install wordnet-base; read "
    f"from {DEBIAN_WORDNET_DIR}), or run `python -m nltk.downloader wordnet` where the network allows, or set "
    f"{WORDNET_ENV} to a folder holding WordNet 3.0's dict files ({', '.join(_WORDNET_FILES[:2])}, ...)")


def _missing_wordnet_files(folder: Path) -> list[str]:
    return [f for f in _WORDNET_FILES if not (folder / f).is_file()]


@lru_cache(maxsize=4)
def _folder_wordnet(folder: str) -> Any:
    """nltk's WordNet reader on a dict folder (Debian's layout: no ``lexnames`` file, no ``index.sense``)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _DictFolderReader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not os.path.isfile(os.path.join(folder, "lexnames")):
                return io.StringIO("".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n"
                                           for i, name in enumerate(_LEXNAMES)))
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None  # the folder is WordNet 3.0, nltk's own version: nothing to map (needs nltk's data)

    # Recent nltk (nltk.pathsec) opens corpus files only below its data path: authorise this folder there.
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        reader = _DictFolderReader(folder, None)
    log.info("METEOR: WordNet %s read from %s", reader.get_version(), folder)
    return reader


def _nltk_data_wordnet() -> Any | None:
    """nltk's own WordNet (``nltk.download("wordnet")``) if it is installed, else None; never downloads."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None
    return wordnet


def load_wordnet() -> Any:
    """The WordNet reader METEOR uses, found offline; the first of:

    1. the folder in ``$LLM_CXR_WORDNET`` (WordNet 3.0 dict files), if that variable is set (nothing else is tried);
    2. nltk's data (``python -m nltk.downloader wordnet``);
    3. Debian's ``wordnet-base`` package in /usr/share/wordnet.

    Raises :class:`~llm_cxr.errors.MetricUnavailable`, naming what to install, when there is none.
    """
    try:
        import nltk  # noqa: F401
    except ImportError as e:
        raise MetricUnavailable("METEOR needs nltk, which is not installed: pip install nltk") from e
    env = os.environ.get(WORDNET_ENV)
    if env:
        folder = Path(env).expanduser().resolve()
        missing = _missing_wordnet_files(folder)
        if missing:
            raise MetricUnavailable(f"{WORDNET_ENV}={env} is not a WordNet dict folder (no {', '.join(missing)}). "
                                    + _INSTALL_WORDNET)
        return _folder_wordnet(str(folder))
    reader = _nltk_data_wordnet()
    if reader is not None:
        return reader
    if not _missing_wordnet_files(DEBIAN_WORDNET_DIR):
        return _folder_wordnet(str(DEBIAN_WORDNET_DIR))
    raise MetricUnavailable(f"no WordNet found ({WORDNET_ENV} unset, none in nltk's data path, none in "
                            f"{DEBIAN_WORDNET_DIR}). " + _INSTALL_WORDNET)


def meteor_available() -> bool:
    """Whether :func:`meteor_scores` can run here (nltk and WordNet found)."""
    try:
        load_wordnet()
    except MetricUnavailable:
        return False
    return True


def meteor_scores(predictions: Sequence[str], references: References) -> np.ndarray:
    """Per-study METEOR, ``(N,)``, by nltk's ``meteor_score`` on :func:`tokenize`'s tokens (max over references)."""
    hyps, refs = _tokenized_corpus(predictions, references)
    wordnet = load_wordnet()
    from nltk.translate.meteor_score import meteor_score

    return np.array([meteor_score(r, h, wordnet=wordnet) if h else 0.0 for h, r in zip(hyps, refs)],
                    dtype=np.float64)


# ---- all at once, and the Hugging Face `evaluate` modules ---------------------------------------

def corpus_scores(predictions: Sequence[str], references: References, meteor: bool | None = None
                  ) -> dict[str, float]:
    """bleu_1..bleu_4, rouge_l, cider (CIDEr-D) and meteor of a corpus.

    ``meteor``: True requires it, False leaves it out, None (default) adds it when WordNet is available.
    """
    out = dict(corpus_bleu(predictions, references))
    out["rouge_l"] = float(np.mean(rouge_l_scores(predictions, references))) if len(predictions) else 0.0
    out["cider"] = float(np.mean(cider_d_scores(predictions, references))) if len(predictions) else 0.0
    if meteor or (meteor is None and meteor_available()):
        out["meteor"] = float(np.mean(meteor_scores(predictions, references))) if len(predictions) else 0.0
    return out


def metric_path(name: str) -> Path:
    """The folder of the ``evaluate`` module ``name`` (one of :data:`METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ConfigError(f"unknown language metric {name!r}: choose one of {', '.join(METRIC_NAMES)}")
    return HF_METRICS_DIR / name


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of the project's module ``name`` from its folder (works offline; kwargs go to load)."""
    path = metric_path(name)  # checks the name before the slow import
    import evaluate

    return evaluate.load(str(path), **kwargs)
