"""The embedded default language model: a tokenizer trained on reports and a small GPT-NeoX.

No pretrained LM can be downloaded here, so the default base is made from the data: a byte-level BPE tokenizer
trained on the training split's reports (plus the prompt templates, so that instruction formatting costs few
tokens), and a small GPT-NeoX (Black et al., 2022, the Pythia/Dolly architecture LLM-CXR fine-tuned) first trained
as a language model on report text. The multimodal stage is then a real fine-tune of a language model, as with
Dolly. Real use points ``base:`` at a hub name or a local checkpoint instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from llm_cxr.configs import run_versions
from llm_cxr.errors import ConfigError
from llm_cxr.lm.prompts import (
    DEVICE_QUESTIONS,
    IMAGE_INSTRUCTIONS,
    IMPRESSION_INSTRUCTIONS,
    LATERALITY_QUESTIONS,
    LIST_QUESTIONS,
    NAMES,
    PRESENCE_QUESTIONS,
    REPORT_INSTRUCTIONS,
    SEVERITY_QUESTIONS,
    TEMPLATES,
)
from llm_cxr.lm.run import trainable_summary
from llm_cxr.rng import seeded
from llm_cxr.train.config import PretrainConfig
from llm_cxr.train.loop import train_loop
from llm_cxr.train.lora import pick_attention

log = logging.getLogger(__name__)
EOS, PAD = "<|endoftext|>", "<|padding|>"


def pretrain_base(cfg: PretrainConfig, accelerator=None) -> Path:
    """Train the report tokenizer and a small GPT-NeoX on the reports; the base is ``OUT/model``."""
    import datasets

    from llm_cxr.accel import make_accelerator
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.train.base import build_base_model, get_base_preset, train_text_tokenizer

    preset = get_base_preset(cfg.preset)
    accelerator = accelerator or make_accelerator(cfg.loop.mixed_precision)
    run = Path(cfg.out)
    model_dir = run / "model"
    ds = load_dataset(cfg.data).select_columns(["report", "split"])
    splits = ds["split"]
    reports = ds["report"]
    train_texts = [r for r, s in zip(reports, splits) if s == cfg.split]
    if not train_texts:
        raise ConfigError(f"{cfg.data} has no reports in split {cfg.split!r}")
    with accelerator.main_process_first():
        if (model_dir / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        else:
            tok = train_text_tokenizer(train_texts, preset.vocab)
            if accelerator.is_main_process:
                tok.save_pretrained(model_dir)
    model = build_base_model(preset, len(tok), seed=cfg.loop.seed)
    model.set_attn_implementation(pick_attention("auto", accelerator.device, cfg.loop.mixed_precision))

    def tokenise(texts: list[str]):
        ids = [x[:preset.context - 1] + [tok.eos_token_id] for x in tok(texts, add_special_tokens=False)["input_ids"]]
        return datasets.Dataset.from_dict({"input_ids": ids, "n_prompt": [0] * len(ids),
                                           "length": [len(x) for x in ids]})

    train = tokenise(train_texts)
    ev_texts = [r for r, s in zip(reports, splits) if s == cfg.eval_split]
    ev = tokenise(ev_texts) if ev_texts else None
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        (run / "versions.json").write_text(json.dumps(run_versions("transformers"), indent=2) + "\n")
    accelerator.wait_for_everyone()
    log.info("pretraining a %s GPT-NeoX (%s) on %d reports", cfg.preset, trainable_summary(model), len(train))
    pos = train_loop(model, train, ev, tok.pad_token_id, cfg.loop, run, accelerator, desc="pretrain")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        if pos.step >= cfg.loop.steps:
            (run / "DONE").write_text(json.dumps({"steps": pos.step}) + "\n")
    accelerator.wait_for_everyone()
    return model_dir


@dataclass(frozen=True)
class BasePreset:
    hidden: int
    layers: int
    heads: int
    context: int
    vocab: int  # BPE vocabulary trained on the reports (before image tokens)


BASE_PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(hidden=128, layers=3, heads=4, context=512, vocab=1024),
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
    texts += list(REPORT_INSTRUCTIONS + IMAGE_INSTRUCTIONS + IMPRESSION_INSTRUCTIONS + DEVICE_QUESTIONS
                  + LIST_QUESTIONS)
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
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                        num_attention_heads=preset.heads, intermediate_size=4 * preset.hidden,
                        max_position_embeddings=preset.context, rotary_pct=0.25, use_parallel_residual=True,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    with seeded(seed):
        return GPTNeoXForCausalLM(cfg)
