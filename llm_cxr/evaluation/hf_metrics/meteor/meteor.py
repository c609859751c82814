"""METEOR of llm-cxr (nltk's meteor_score with WordNet, R2Gen's tokenisation) as an ``evaluate`` module."""

import evaluate
import numpy as np

from llm_cxr.evaluation import language
from llm_cxr.evaluation.hf_metrics import CITATION_COCO, INPUTS, features

_CITATION = """\
@inproceedings{banerjee2005meteor,
  title={{METEOR}: An Automatic Metric for {MT} Evaluation with Improved Correlation with Human Judgments},
  author={Banerjee, Satanjeev and Lavie, Alon},
  booktitle={Proceedings of the ACL Workshop on Intrinsic and Extrinsic Evaluation Measures for Machine Translation
             and/or Summarization},
  pages={65--72},
  year={2005}
}
""" + CITATION_COCO

_DESCRIPTION = (
    "METEOR (Banerjee & Lavie, 2005) as nltk.translate.meteor_score computes it: exact, Porter-stem and WordNet "
    "synonym matches, alpha 0.9, beta 3, gamma 0.5, the best reference per study; the corpus score is the mean over "
    "studies. Not coco-caption's Java METEOR 1.5 (paraphrase tables), whose numbers are not comparable. WordNet is "
    "read offline (llm_cxr.evaluation.language.load_wordnet: $LLM_CXR_WORDNET, nltk's data, or Debian's "
    "wordnet-base in /usr/share/wordnet); without it compute raises MetricUnavailable. " + language.TOKENIZATION
)

_KWARGS_DESCRIPTION = INPUTS + """Returns:
    meteor (float, 0..1): the mean over studies.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Meteor(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features(),
                                   reference_urls=["https://www.nltk.org/api/nltk.translate.meteor_score.html"])

    def _compute(self, predictions, references):
        scores = language.meteor_scores(predictions, references)
        return {"meteor": float(np.mean(scores)) if len(scores) else 0.0}
