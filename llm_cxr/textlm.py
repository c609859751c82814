"""The embedded default language model: a tokenizer trained on reports and a small GPT-NeoX.

No pretrained LM can be downloaded here, so the default base is made from the data: a
byte-level BPE tokenizer trained on the training split's reports (plus the prompt templates,
so that instruction formatting costs few tokens), and a small GPT-NeoX (Black et al., 2022,
the Pythia/Dolly architecture LLM-CXR fine-tuned) first trained as a language model on report
text. The multimodal stage is then a real fine-tune of a language model, as with Dolly.
Real use points ``base:`` at a hub name or a local checkpoint instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from llm_cxr.errors import ConfigError
from llm_cxr.prompts import (DEVICE_QUESTIONS, IMAGE_INSTRUCTIONS, IMPRESSION_INSTRUCTIONS, LATERALITY_QUESTIONS,
                             LIST_QUESTIONS, NAMES, PRESENCE_QUESTIONS, REPORT_INSTRUCTIONS, SEVERITY_QUESTIONS,
                             TEMPLATES)

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|padding|>"


@dataclass(frozen=True)
class BasePreset:
    hidden: int
    layers: int
    heads: int
    context: int
    vocab: int  # BPE vocabulary trained on the reports (before image tokens)


BASE_PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(hidden=128, layers=3, heads=4, context=256, vocab=1024),
    "small": BasePreset(hidden=256, layers=6, heads=4, context=512, vocab=2048),
}


def get_base_preset(name: str) -> BasePreset:
    if name not in BASE_PRESETS:
        raise ConfigError(f"unknown base-model preset {name!r}; known: {', '.join(BASE_PRESETS)}")
    return BASE_PRESETS[name]


def prompt_corpus() -> list[str]:
    """Every fixed string a prompt is built from, so the tokenizer learns them as few tokens."""
    texts = []
    for t in TEMPLATES.values():
        texts += [t.preamble + t.instruction_key, t.input_key, t.response_key, t.end_key]
    texts += list(REPORT_INSTRUCTIONS + IMAGE_INSTRUCTIONS + IMPRESSION_INSTRUCTIONS + DEVICE_QUESTIONS + LIST_QUESTIONS)
    for name in NAMES.values():
        texts += [q.format(a="a ", name=name) for q in PRESENCE_QUESTIONS + LATERALITY_QUESTIONS + SEVERITY_QUESTIONS]
    texts += ["yes", "no", "left", "right", "both sides", "none", "no acute abnormality"]
    return texts


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (EOS ``<|endoftext|>``, pad ``<|padding|>``), as Pythia's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ConfigError("cannot train a tokenizer on no text")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts + prompt_corpus() * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)


def build_base_model(preset: BasePreset, vocab_size: int, seed: int = 0):
    """A randomly initialised GPT-NeoX for ``preset`` (parallel residual, rotary, as Pythia)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                        num_attention_heads=preset.heads, intermediate_size=4 * preset.hidden,
                        max_position_embeddings=preset.context, rotary_pct=0.25, use_parallel_residual=True,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg)
