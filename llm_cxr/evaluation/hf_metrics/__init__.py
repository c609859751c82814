"""Hugging Face ``evaluate`` modules of the report language metrics, one folder each, loaded from their path.

``evaluate.load("bleu")`` fetches a script from the hub (not reachable offline, and not our tokenisation); these
load from the installed package instead: ``llm_cxr.evaluation.language.load_metric("bleu")``, which is
``evaluate.load(<this folder>/bleu)``. Each module delegates to :mod:`llm_cxr.evaluation.language`.
"""

from __future__ import annotations

from typing import Any

CITATION_COCO = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
@inproceedings{chen2020generating,
  title={Generating Radiology Reports via Memory-driven Transformer},
  author={Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang},
  booktitle={Proceedings of EMNLP},
  pages={1439--1449},
  year={2020}
}
"""

INPUTS = """
Args:
    predictions (list of str): one generated report per study.
    references (list of str, or list of list of str): the reference report(s) of each study.
"""


def features() -> list[Any]:
    """One reference per study (a string) or several (a list of strings)."""
    import datasets

    text = datasets.Value("string", id="sequence")
    return [datasets.Features({"predictions": text, "references": datasets.Sequence(text, id="references")}),
            datasets.Features({"predictions": text, "references": text})]
