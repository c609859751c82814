"""RadGraph F1 (Delbrouck et al., "Improving the factual correctness of radiology report generation with semantic
rewards", Findings of EMNLP 2022), when the user has the RadGraph model's weights.

RadGraph (Jain et al., NeurIPS 2021 datasets track) annotates a report with entities (a token span and a label
such as ``ANAT-DP`` or ``OBS-DA``) and relations between them (``located_at``, ``modify``, ``suggestive_of``).
RadGraph F1 compares the annotations of a generated and a reference report at three levels, each an F1 over the
two sets of items of one report (precision over the generated report's items, recall over the reference's):

- ``simple`` (the paper's RG_E): an item is an entity, (tokens, label);
- ``partial`` (RG_ER): an entity with relations is (tokens, label, True), one without is (tokens, label);
- ``complete`` (RG_ER-bar): each relation of an entity is (tokens, label, relation, target tokens), lower-cased;
  an entity without relations is (tokens, label).

A report pair where either text is empty, or either annotation has no entity, scores 0 at all three levels; the
corpus score is the mean over reports. This follows the reward functions of the ``radgraph`` package (PyPI,
version 0.1.18, ``radgraph/rewards.py``, MIT licence), re-implemented here so that scoring needs none of it;
a test compares the two on the same annotations where the package is installed.

The annotator is the package's DyGIE++ model, loaded from a local folder (``config.json``, ``vocabulary/``,
``weights.th``: ``radgraph.tar.gz`` from the hub repository StanfordAIMI/RRG_scorers, extracted); the BERT its
config names must already be in the local Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from llm_cxr.errors import MetricUnavailable

log = logging.getLogger(__name__)

Annotation = Mapping  # {"entities": {id: {"tokens": str, "label": str, "relations": [[relation, target id], ...]}}}
Annotator = Callable[[Sequence[str]], list[Annotation]]  # reports -> one annotation per report, in order

MODEL_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl")  # chest X-ray models of the package
_HOW = ("RadGraph F1 needs the radgraph package (pip install 'llm-cxr[radgraph]', or pip install radgraph) and the "
        "RadGraph model: radgraph.tar.gz from the Hugging Face hub repository StanfordAIMI/RRG_scorers, extracted "
        "into a folder (config.json, vocabulary/, weights.th) given with --radgraph, with the BERT its config.json "
        "names in the local Hugging Face cache")


class RadGraphF1(NamedTuple):
    simple: float
    partial: float
    complete: float


ZERO = RadGraphF1(0.0, 0.0, 0.0)


def _entities(annotation: Annotation) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(tokens, label, [(relation, target tokens)]) per entity; a relation to an entity the annotation lacks is
    dropped (the package never writes one)."""
    ents = annotation.get("entities") or {}
    out = []
    for e in ents.values():
        rels = [(str(r[0]), ents[r[1]]["tokens"]) for r in e.get("relations") or () if r[1] in ents]
        out.append((e["tokens"], e["label"], rels))
    return out


def _items(entities, level: str) -> set[tuple]:
    items: set[tuple] = set()
    for tokens, label, rels in entities:
        if not rels or level == "simple":
            items.add((tokens, label))
        elif level == "partial":
            items.add((tokens, label, True))
        else:  # complete; the reference lower-cases only here
            items.update((tokens.lower(), label, rel, target.lower()) for rel, target in rels)
    return items


def _f1(hyp: set, ref: set) -> float:
    p = len(hyp & ref) / len(hyp) if hyp else 0.0
    r = len(hyp & ref) / len(ref) if ref else 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def radgraph_f1(hyp: Annotation, ref: Annotation) -> RadGraphF1:
    """The three reward levels of one generated report's annotation against its reference's."""
    h, r = _entities(hyp), _entities(ref)
    if not h or not r:
        return ZERO
    return RadGraphF1(*(_f1(_items(h, lv), _items(r, lv)) for lv in RadGraphF1._fields))


def radgraph_scores(preds: Sequence[str], refs: Sequence[str], annotator: Annotator) -> list[RadGraphF1]:
    """Per report pair; empty texts are not annotated and score 0. Both sides go to the annotator in one call."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    keep = [i for i, (p, r) in enumerate(zip(preds, refs)) if (p or "").strip() and (r or "").strip()]
    ann = annotator([preds[i] for i in keep] + [refs[i] for i in keep]) if keep else []
    if len(ann) != 2 * len(keep):
        raise ValueError(f"the RadGraph annotator returned {len(ann)} annotations for {2 * len(keep)} reports")
    out = [ZERO] * len(preds)
    for j, i in enumerate(keep):
        out[i] = radgraph_f1(ann[j], ann[len(keep) + j])
    return out


def mean_scores(scores: Iterable[RadGraphF1]) -> RadGraphF1:
    """The corpus score: the mean of each level over reports (empty reports included, at 0)."""
    scores = list(scores)
    if not scores:
        return ZERO
    return RadGraphF1(*(sum(s[k] for s in scores) / len(scores) for k in range(3)))


# --- the annotator: the radgraph package's model from a local folder -------------------------------------------


def bert_snapshot(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local folder of the BERT ``name``: ``name`` itself if it is a folder, else its snapshot in the Hugging
    Face cache (``cache_dir``, default the user's), or None when it is not there."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a name the hub would refuse is simply not in the cache
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _bert_names(config: dict) -> dict[tuple[str, ...], str]:
    paths = [("dataset_reader", "token_indexers", "bert", "model_name"),
             ("model", "embedder", "token_embedders", "bert", "model_name")]
    out = {}
    for path in paths:
        node = config
        for k in path:
            node = node[k]
        out[path] = node
    return out


def _local_config(folder: Path, cache_dir: str | Path | None) -> dict:
    """The model's config.json with each BERT name replaced by its local folder, so that loading stays offline."""
    for need in ("config.json", "vocabulary", "weights.th"):
        if not (folder / need).exists():
            raise MetricUnavailable(f"{folder} has no {need}: {_HOW}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        names = _bert_names(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MetricUnavailable(f"{folder}/config.json is not a RadGraph model config ({_one_line(e)})") from e
    for path, name in names.items():
        local = bert_snapshot(name, cache_dir)
        if local is None:
            raise MetricUnavailable(f"{name}, the BERT that {folder}/config.json names, is not in the local Hugging "
                                    f"Face cache: fetch it where the hub is reachable (huggingface-cli download "
                                    f"{name}) and copy that cache here (HF_HOME)")
        node = config
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = str(local)
    return config


def _cuda_index(device: str) -> int:
    if not device.startswith("cuda"):
        return -1
    return int(device.split(":")[1]) if ":" in device else 0


def load_radgraph(folder: str | Path | None, model_type: str | None = None, device: str = "cpu",
                  cache_dir: str | Path | None = None) -> Annotator:
    """The RadGraph annotator from a local model folder; :class:`MetricUnavailable` naming what is missing otherwise.

    ``model_type`` (one of :data:`MODEL_TYPES`) picks the package's tokenisation of reports; default the folder's
    name when it is one of them, else ``radgraph``, the model of Delbrouck et al. Annotations are remembered by
    text, so references scored for two systems are annotated once."""
    if not folder:
        raise MetricUnavailable(_HOW)
    folder = Path(folder)
    model_type = model_type or (folder.name if folder.name in MODEL_TYPES else "radgraph")
    if model_type not in MODEL_TYPES:
        raise MetricUnavailable(f"unknown RadGraph model type {model_type!r}; one of {', '.join(MODEL_TYPES)}")
    config = _local_config(folder, cache_dir)
    try:
        with warnings.catch_warnings():  # the package sets a warning filter on import; keep it to this block
            from radgraph import RadGraph
    except ImportError as e:
        raise MetricUnavailable(f"{_HOW} ({e})") from e
    model = _build(RadGraph, folder, model_type, config, device)
    try:  # a model that loads but cannot read a report would otherwise score every study 0
        _run(model, ["No pleural effusion."])
    except Exception as e:  # noqa: BLE001
        raise MetricUnavailable(f"{folder}: the RadGraph model loaded but fails on a report ({_one_line(e)})") from e
    memo: dict[str, Annotation] = {}

    def annotate(texts: Sequence[str]) -> list[Annotation]:
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        if todo:
            memo.update(zip(todo, _annotate_each(model, todo)))
        return [memo[t] for t in texts]

    annotate.name = f"radgraph:{model_type}"
    return annotate


def _encode_plus(self, text, text_pair=None, **kwargs):
    return self(text, text_pair, **kwargs)  # what transformers 5 offers in its place, same arguments


def _build_inputs_with_special_tokens(self, ids_0: list[int], ids_1: list[int] | None = None) -> list[int]:
    """The special tokens the tokenizer puts around one text (or between two), found by encoding a dummy one."""
    def around(*texts: str) -> list[list[int]]:
        full, parts, at = self.encode(*texts, add_special_tokens=True), [], 0
        for t in texts:
            plain = self.encode(t, add_special_tokens=False)
            i = next(j for j in range(at, len(full)) if full[j:j + len(plain)] == plain)
            parts.append(full[at:i])
            at = i + len(plain)
        return parts + [full[at:]]

    if ids_1 is None:
        start, end = around("a")
        return start + list(ids_0) + end
    start, mid, end = around("a", "b")
    return start + list(ids_0) + mid + list(ids_1) + end


_SHIMS = {"encode_plus": _encode_plus, "build_inputs_with_special_tokens": _build_inputs_with_special_tokens}


@contextlib.contextmanager
def transformers_compat():
    """Lend tokenizers the methods the package calls while it runs, where transformers no longer has them.

    radgraph 0.1.18 (the latest) vendors allennlp code that calls ``encode_plus`` and
    ``build_inputs_with_special_tokens``, which transformers 5 removed; without them the model cannot even load.
    They are removed again on exit, so nothing else sees them."""
    from transformers import PreTrainedTokenizerBase

    lent = [name for name in _SHIMS if not hasattr(PreTrainedTokenizerBase, name)]
    for name in lent:
        setattr(PreTrainedTokenizerBase, name, _SHIMS[name])
    try:
        yield
    finally:
        for name in lent:
            delattr(PreTrainedTokenizerBase, name)


def _run(model, texts: list[str]) -> list[Annotation]:
    # the package prints; our stdout is the results table
    with transformers_compat(), contextlib.redirect_stdout(io.StringIO()) as said:
        got = model(texts)
    if said.getvalue().strip():
        log.debug("radgraph: %s", said.getvalue().strip())
    # a report the package's post-processing failed on has no key: it has no entities, as the package scores it
    return [got.get(str(j), {"entities": {}}) for j in range(len(texts))]


def _annotate_each(model, texts: list[str]) -> list[Annotation]:
    """All at once; when that fails, one by one, and a report the model fails on counts as having no entities
    (scores 0), with a warning, so that one bad report does not lose the others."""
    try:
        return _run(model, texts)
    except Exception:  # noqa: BLE001 - find the report(s) at fault below
        pass
    out, failed, why = [], 0, ""
    for t in texts:
        try:
            out += _run(model, [t])
        except Exception as e:  # noqa: BLE001
            out.append({"entities": {}})
            failed, why = failed + 1, _one_line(e)
    if failed:
        log.warning("RadGraph could not annotate %d of %d reports (%s); they score 0", failed, len(texts), why)
    return out


def _build(RadGraph, folder: Path, model_type: str, config: dict, device: str):
    """The package's model, from a temporary folder laid out as its cache (``TYPE/``: our config, a copy of the
    vocabulary, the weights linked), so that it finds everything and downloads nothing."""
    with tempfile.TemporaryDirectory(prefix="llm-cxr-radgraph-") as tmp:
        model_dir = Path(tmp) / model_type
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
        shutil.copytree(folder / "vocabulary", model_dir / "vocabulary")  # the package writes a lock file there
        try:
            os.symlink((folder / "weights.th").resolve(), model_dir / "weights.th")
        except OSError:  # no symlinks here (some Windows setups): a copy does
            shutil.copy(folder / "weights.th", model_dir / "weights.th")
        try:
            with transformers_compat(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return RadGraph(model_type=model_type, model_cache_dir=tmp, cuda=_cuda_index(device))
        except Exception as e:  # noqa: BLE001 - a wrong or damaged model folder: say so in one line
            raise MetricUnavailable(f"{folder}: the RadGraph model could not be loaded ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
