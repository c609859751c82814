"""ROUGE-L of llm-cxr (coco-caption's definition, R2Gen's tokenisation) as an ``evaluate`` module."""

import evaluate
import numpy as np

from llm_cxr.evaluation import language
from llm_cxr.evaluation.hf_metrics import CITATION_COCO, INPUTS, features

_CITATION = """\
@inproceedings{lin2004rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  pages={74--81},
  year={2004}
}
""" + CITATION_COCO

_DESCRIPTION = (
    "ROUGE-L (Lin, 2004) as coco-caption computes it: per study the longest common subsequence with each "
    "reference, the best precision P and best recall R over the references, F = (1 + b^2) P R / (R + b^2 P) with "
    "b = 1.2 (b = 1: rouge-score's rougeL F-measure for one reference); the corpus score is the mean over studies. "
    + language.TOKENIZATION
)

_KWARGS_DESCRIPTION = INPUTS + """    beta (float, default 1.2): weight of recall over precision.
Returns:
    rouge_l (float, 0..1): the mean over studies.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features(), reference_urls=["https://github.com/salaniz/pycocoevalcap"])

    def _compute(self, predictions, references, beta=1.2):
        scores = language.rouge_l_scores(predictions, references, beta=beta)
        return {"rouge_l": float(np.mean(scores)) if len(scores) else 0.0}
