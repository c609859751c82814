"""Corpus BLEU-1..4 of llm-cxr (coco-caption's definition, R2Gen's tokenisation) as an ``evaluate`` module."""

import evaluate

from llm_cxr.evaluation import language
from llm_cxr.evaluation.hf_metrics import CITATION_COCO, INPUTS, features

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={Proceedings of ACL},
  pages={311--318},
  year={2002}
}
""" + CITATION_COCO

_DESCRIPTION = (
    "Corpus BLEU-1..4 (Papineni et al., 2002) as radiology report generation papers report it with coco-caption: "
    "clipped n-gram matches summed over the corpus, BLEU-n the geometric mean of the precisions of orders 1..n, the "
    "closest reference length (ties to the shorter), brevity penalty exp(1 - r/c) when c < r, no smoothing. "
    + language.TOKENIZATION
)

_KWARGS_DESCRIPTION = INPUTS + """    max_order (int, default 4): the highest n-gram order.
Returns:
    bleu_1 .. bleu_<max_order> (float, 0..1).
Examples:
    >>> bleu = llm_cxr.evaluation.language.load_metric("bleu")
    >>> bleu.compute(predictions=["no pleural effusion"], references=[["no pleural effusion"]])["bleu_1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features(), reference_urls=["https://github.com/salaniz/pycocoevalcap"])

    def _compute(self, predictions, references, max_order=4):
        return language.corpus_bleu(predictions, references, max_order=max_order)
