"""CIDEr-D of llm-cxr (pycocoevalcap's Cider, R2Gen's tokenisation) as an ``evaluate`` module."""

import evaluate
import numpy as np

from llm_cxr.evaluation import language
from llm_cxr.evaluation.hf_metrics import CITATION_COCO, INPUTS, features

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={{CIDEr}: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={Proceedings of CVPR},
  pages={4566--4575},
  year={2015}
}
""" + CITATION_COCO

_DESCRIPTION = (
    "CIDEr-D (Vedantam et al., 2015) exactly as pycocoevalcap's Cider scorer: tf-idf weighted 1..n-gram vectors "
    "with document frequencies from the reference sets of the scored corpus (score a whole test set in one call), "
    "hypothesis weights clipped by the reference weights, a Gaussian length penalty (sigma 6), x10, mean over n "
    "and references; the corpus score is the mean over studies. " + language.TOKENIZATION
)

_KWARGS_DESCRIPTION = INPUTS + """    n (int, default 4): the highest n-gram order.
    sigma (float, default 6.0): width of the length penalty.
Returns:
    cider (float, >= 0, up to 10 per study): the mean over studies.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features(), reference_urls=["https://github.com/salaniz/pycocoevalcap"])

    def _compute(self, predictions, references, n=4, sigma=6.0):
        scores = language.cider_d_scores(predictions, references, n=n, sigma=sigma)
        return {"cider": float(np.mean(scores)) if len(scores) else 0.0}
