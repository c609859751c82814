"""Loading a causal LM, adding LoRA adapters, saving and loading an llm-cxr run.

Any ``AutoModelForCausalLM`` works (GPT-NeoX, Llama, Qwen, ...): LoRA targets are found by
walking the model for the linear layers of its blocks, and the rows of the new image tokens are
trained through peft's ``trainable_token_indices`` in the input embeddings and, when untied,
the output head (LoRA: Hu et al., ICLR 2022). Full fine-tuning, what LLM-CXR did, is an option.

A run's ``model/`` folder is everything inference needs: ``run.json`` (what kind of weights,
the base model, the VQ-GAN it was trained with, the prompt template), the tokenizer with its
image tokens, ``image_tokens.json``, and either a peft adapter or full weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_cxr import imagepos
from llm_cxr.diagnosis import HEAD_FILE
from llm_cxr.errors import ConfigError
from llm_cxr.tokens import ImageTokenMap, add_image_tokens

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "auto"  # "auto": every linear layer inside the transformer blocks
    train_new_tokens: bool = True  # the image-token rows of the input embeddings and output head

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be > 0, got {self.r} and {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            self.target_modules = [self.target_modules]


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.share:.2f}%)"


def trainable_summary(model) -> TrainableSummary:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return TrainableSummary(trainable, total)


# --------------------------------------------------------------------------- loading a base model


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a tokenizer from {name_or_path!r}: {e}. Give a local folder or a hub "
                          f"name that is cached (this machine may have no internet).") from e
    return ensure_pad_token(tok)


def ensure_pad_token(tok):
    """A tokenizer without a pad token pads with EOS (labels on padding are masked by position, not id)."""
    if tok.eos_token is None:
        raise ConfigError("the tokenizer has no EOS token; set one (tokenizer.eos_token = ...) and save it")
    if tok.pad_token is None:
        log.info("the tokenizer has no pad token: padding with its EOS token %r", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = "sdpa"):
    """``(model, tokenizer)`` for a hub name or a local folder, with clear errors."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError) as e:
        if attn_implementation and "attn" in str(e).lower():
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        else:
            raise ConfigError(f"could not load a causal LM from {name_or_path!r}: {e}") from e
    return model, tok


def pick_attention(choice: str | None, device, mixed_precision: str) -> str | None:
    """transformers' attention implementation for training: ``auto`` = eager for bf16/fp16 on CPU, else SDPA.

    On CPU the SDPA (flash) kernel gains nothing from bf16 while the eager matmuls do: measured
    in benchmarks/results/lm_train.md (small preset, 8,289 vs 7,502 tokens/s). Elsewhere SDPA.
    """
    if choice not in (None, "auto"):
        return choice
    on_cpu = torch.device(device).type == "cpu"
    return "eager" if on_cpu and mixed_precision in ("bf16", "fp16") else "sdpa"


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def embedding_names(model) -> tuple[str, str | None]:
    """Module names of the input embeddings and of the output head (None when tied to the input)."""
    names = _module_names(model)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    in_name = names[id(inp)].split(".")[-1]
    if out is None or out.weight is inp.weight:
        return in_name, None
    return in_name, names[id(out)].split(".")[-1]


def auto_lora_targets(model) -> list[str]:
    """Names (last component) of the linear layers inside the blocks: attention and MLP projections."""
    out_head = model.get_output_embeddings()
    found: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not out_head and any(ch.isdigit() for ch in name.split(".")):
            leaf = name.split(".")[-1]
            if leaf not in found:
                found.append(leaf)
    if not found:
        raise ConfigError(f"found no linear layers inside the blocks of {type(model).__name__}; "
                          f"give lora.target_modules explicitly")
    return found


def check_lora_targets(model, targets: list[str]) -> None:
    leaves = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
                          f"its linear layers are {sorted(leaves)}")


def apply_lora(model, token_map: ImageTokenMap | None, settings: LoraSettings):
    """Wrap ``model`` with LoRA adapters; the image-token rows are trainable in both embeddings."""
    from peft import LoraConfig, get_peft_model

    targets = auto_lora_targets(model) if settings.target_modules == "auto" else list(settings.target_modules)
    check_lora_targets(model, targets)
    trainable_tokens = None
    if settings.train_new_tokens and token_map is not None:
        ids = list(token_map.image_ids) + [token_map.begin_id, token_map.end_id]
        in_name, out_name = embedding_names(model)
        trainable_tokens = {in_name: ids} if out_name is None else {in_name: ids, out_name: ids}
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                     trainable_token_indices=trainable_tokens, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    log.info("LoRA r=%d on %s; %s", settings.r, targets, trainable_summary(peft_model))
    return peft_model


# --------------------------------------------------------------------------- run folders


@dataclass
class RunInfo:
    """``model/run.json``: what inference needs to know besides the weights."""

    kind: str  # "lora" | "full"
    base: str  # the base model (hub name or absolute path) the adapter applies to
    vqgan: str | None  # the VQ-GAN run the codes came from
    template: str = "compact"
    max_length: int = 512
    extra: dict = field(default_factory=dict)

    def resolve(self, what: str, folder: Path) -> str | None:
        """``base`` or ``vqgan``: the recorded path, or the same path relative to ``folder`` if the tree moved."""
        ref = getattr(self, what)
        rel = self.extra.get(f"{what}_relative")
        if ref and not Path(ref).exists() and rel and (folder / rel).exists():
            return str((folder / rel).resolve())
        return ref

    def save(self, folder: Path) -> None:
        (folder / RUN_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "RunInfo":
        path = folder / RUN_FILE
        if not path.exists():
            raise ConfigError(f"{folder} has no {RUN_FILE}: it is not an llm-cxr language-model run")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a valid run description: {e}") from e


def model_dir(run: str | Path) -> Path:
    """A run folder or its ``model/`` subfolder -> the folder holding the weights."""
    run = Path(run)
    if (run / RUN_FILE).exists():
        return run
    if (run / "model" / RUN_FILE).exists():
        return run / "model"
    if not run.exists():
        raise ConfigError(f"model run {run} does not exist")
    raise ConfigError(f"{run} is not an llm-cxr language-model run (no {RUN_FILE}, no model/{RUN_FILE}); "
                      f"train one with `llm-cxr train`")


def save_model(model, tokenizer, token_map: ImageTokenMap | None, info: RunInfo, folder: str | Path) -> Path:
    """Write adapter or full weights, tokenizer, token map and run.json into ``folder`` (replacing it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with imagepos.detached(model) as positions:  # transformers/peft see the plain model's parameter names
        model.save_pretrained(folder)
    stale = folder / imagepos.POSITIONS_FILE
    if positions is not None:
        imagepos.save_positions(positions, folder)
    elif stale.exists():
        stale.unlink()
    tokenizer.save_pretrained(folder)
    if token_map is not None:
        token_map.save(folder)
    info.save(folder)
    return folder


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    token_map: ImageTokenMap
    info: RunInfo
    folder: Path


def load_run(run: str | Path, dtype: torch.dtype | None = None, merge: bool = False,
             device: str | torch.device | None = None, trainable: bool = False,
             attn_implementation: str | None = "sdpa") -> LoadedRun:
    """Load a trained run in one call: model (adapter applied, or merged), tokenizer, token map.

    ``trainable=True`` keeps the adapter trainable (a next stage continues it).
    """
    from transformers import AutoModelForCausalLM

    folder = model_dir(run)
    info = RunInfo.load(folder)
    token_map = ImageTokenMap.load(folder)
    tok = ensure_pad_token(load_tokenizer(str(folder)))
    if info.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation,
                                                     **({"dtype": dtype} if dtype else {}))
    elif info.kind == "lora":
        from peft import PeftModel

        model, base_tok = load_causal_lm(info.resolve("base", folder), dtype=dtype,
                                         attn_implementation=attn_implementation)
        made = add_image_tokens(base_tok, model, token_map.n_codes, token_map.grid_size, token_map.vqgan_fingerprint)
        if made.first_id != token_map.first_id or made.vocab_size != token_map.vocab_size:
            raise ConfigError(f"the base model {info.base} gives image tokens at {made.first_id} (vocabulary "
                              f"{made.vocab_size}), the run was trained with {token_map.first_id} "
                              f"({token_map.vocab_size}): the base model changed")
        model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
        if merge:
            model = model.merge_and_unload()
    else:
        raise ConfigError(f"{folder / RUN_FILE}: unknown kind {info.kind!r} (expected 'lora' or 'full')")
    if len(tok) != token_map.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {len(tok)} tokens, image_tokens.json expects "
                          f"{token_map.vocab_size}")
    saved = imagepos.load_positions(folder)
    if saved is not None:
        imagepos.attach(model, token_map, *saved)
    if not trainable:
        model.eval()
    if device is not None:
        model.to(device)
    return LoadedRun(model, tok, token_map, info, folder)


def merge_run(run: str | Path, out: str | Path) -> Path:
    """Merge a LoRA run into its base and write a self-contained ``full`` run folder."""
    loaded = load_run(run, merge=True)
    if loaded.info.kind != "lora":
        raise ConfigError(f"{loaded.folder} holds full weights already; nothing to merge")
    info = RunInfo(**{**asdict(loaded.info), "kind": "full", "extra": {**loaded.info.extra,
                                                                       "merged_from": str(loaded.folder)}})
    folder = save_model(loaded.model, loaded.tokenizer, loaded.token_map, info, out)
    if (loaded.folder / HEAD_FILE).exists():  # the finding head is not part of the LM's weights: it travels beside them
        shutil.copyfile(loaded.folder / HEAD_FILE, folder / HEAD_FILE)
    return folder
