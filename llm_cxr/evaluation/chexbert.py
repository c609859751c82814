"""CheXbert (Smit et al., EMNLP 2020) as the labeler of clinical efficacy, when the user has its weights.

CheXbert is BERT-base with 14 linear heads on the [CLS] state: 13 CheXpert observations with four classes
(blank, positive, negative, uncertain) and "No Finding" with two (blank, positive). Its checkpoint
(``chexbert.pth``, from the authors) is a PyTorch file with ``model_state_dict`` (keys prefixed ``module.``, from
``DataParallel``); it is read with ``weights_only=True``, so it runs no code. The BERT configuration and
vocabulary come from a local ``bert-base-uncased`` folder: nothing is downloaded.

``--labeler chexbert`` in ``llm-cxr evaluate`` reads both reports with it instead of the rule-based labeler: the
"CheXbert F1" of the literature (e.g. Miura et al., NAACL 2021; Delbrouck et al., 2022).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from llm_cxr.data.schema import CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from llm_cxr.errors import MetricUnavailable

# CheXbert's head order (its ``CONDITIONS``), as our snake_case CheXpert names
HEAD_ORDER: tuple[str, ...] = (
    "enlarged_cardiomediastinum", "cardiomegaly", "lung_opacity", "lung_lesion", "edema", "consolidation",
    "pneumonia", "atelectasis", "pneumothorax", "pleural_effusion", "pleural_other", "fracture", "support_devices",
    "no_finding")
# head output class -> our label value (0 blank = not mentioned)
_FOUR = {0: None, 1: POSITIVE, 2: NEGATIVE, 3: UNCERTAIN}
_HOW = ("CheXbert needs its checkpoint (chexbert.pth, from the CheXbert authors: github.com/stanfordmlgroup/CheXbert) "
        "and a local bert-base-uncased folder (config.json and vocab.txt); give them with --chexbert-weights and "
        "--bert")
assert set(HEAD_ORDER) == set(CHEXPERT_14)


class CheXbert(nn.Module):
    def __init__(self, config) -> None:
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        h = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(h, 4) for _ in range(13)] + [nn.Linear(h, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.dropout(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])
        return [head(cls) for head in self.linear_heads]


def load_chexbert(weights: str | Path | None, bert: str | Path | None, device: str = "cpu"):
    """(model, tokenizer) from the CheXbert checkpoint and a local BERT folder; :class:`MetricUnavailable` naming
    what is missing otherwise."""
    from transformers import BertConfig, BertTokenizerFast

    if not weights or not bert:
        raise MetricUnavailable(_HOW)
    weights, bert = Path(weights), Path(bert)
    missing = [str(p) for p in (weights, bert / "config.json", bert / "vocab.txt") if not p.is_file()]
    if missing:
        raise MetricUnavailable(f"missing {', '.join(missing)}: {_HOW}")
    try:
        ck = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a wrong or damaged file: say so in one line
        raise MetricUnavailable(f"{weights} is not a readable CheXbert checkpoint ({type(e).__name__}: {e})") from e
    state = ck.get("model_state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise MetricUnavailable(f"{weights} holds no state dict (found {type(ck).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer older BERTs saved
    model = CheXbert(BertConfig.from_pretrained(str(bert)))
    missing_keys, unexpected = model.load_state_dict(state, strict=False)
    if missing_keys or unexpected:
        raise MetricUnavailable(f"{weights} does not fit CheXbert on {bert}: missing {missing_keys[:4]}, "
                                f"unexpected {unexpected[:4]}")
    return model.to(device).eval(), BertTokenizerFast.from_pretrained(str(bert))


def chexbert_labels(texts: Sequence[str], model, tokenizer, batch_size: int = 16) -> list[dict[str, int | None]]:
    """CheXpert labels of each text (1 positive, 0 negative, -1 uncertain, None not mentioned)."""
    out = []
    device = next(model.parameters()).device
    longest = min(512, model.bert.config.max_position_embeddings)  # BERT reads at most 512 tokens; CheXbert too
    for s in range(0, len(texts), batch_size):
        # CheXbert's own preprocessing: whitespace runs to one space; the uncased tokenizer lowercases
        batch = [" ".join((t or "").split()) for t in texts[s:s + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=longest, return_tensors="pt").to(device)
        with torch.no_grad():
            heads = [h.argmax(-1).tolist() for h in model(enc["input_ids"], enc["attention_mask"])]
        for i in range(len(batch)):
            out.append({name: _FOUR[heads[j][i]] for j, name in enumerate(HEAD_ORDER)})
    return out
