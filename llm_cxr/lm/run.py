"""A trained run: loading a base causal LM, saving and loading an llm-cxr run folder, merging LoRA.

Any ``AutoModelForCausalLM`` works (GPT-NeoX, Llama, Qwen, ...). A run's ``model/`` folder is everything
inference needs: ``run.json`` (what kind of weights, the base model, the VQ-GAN it was trained with, the prompt
template), the tokenizer with its image tokens, ``image_tokens.json``, the add-ons' files, and either a peft
adapter or full weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from llm_cxr.configs import check_finished, from_dict_strict
from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import ORDER, AddOn, addon_file, load_addon, record, save_addon
from llm_cxr.lm.addons.head import LEGACY_HEAD_FILE, load_head
from llm_cxr.lm.addons.positions import POSITIONS_FILE, detached, load_legacy_positions
from llm_cxr.lm.tokens import ImageTokenMap, add_image_tokens

log = logging.getLogger(__name__)


RUN_FILE = "run.json"


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


# --------------------------------------------------------------------------- run folders


@dataclass
class GuidedModes:
    """What a run was trained to do with a findings list in its prompts (``stage.*_guided``); a later stage
    inherits it unless it trains the plain form again."""

    reports: bool = False  # writes a report from its reading of the image (finding head or its own checklist)
    vqa: bool = False  # answers a question with its reading stated in the prompt
    images: bool = False  # draws from a report with the findings it states listed (and given to the image plan)
    sides: bool = False  # the stated findings carry their sides
    vqa_focus: bool = False  # a guided question's prompt also states what the list says of the finding it names


RUN_FORMAT = 2  # 2: add-ons listed in run.json, each in its own file; 1 (no "format"): converted on load
_LEGACY_GUIDED = {"guided_reports": "reports", "guided_vqa": "vqa", "guided_images": "images", "guide_sides": "sides"}


@dataclass
class RunInfo:
    """``model/run.json``: what inference needs to know besides the weights."""

    kind: str  # "lora" | "full"
    base: str  # the base model (hub name or absolute path) the adapter applies to
    vqgan: str | None  # the VQ-GAN run the codes came from
    template: str = "compact"
    max_length: int = 512
    addons: list[dict] | None = None  # [{"name", "config"}] in the order they attach; None: a format-1 run
    guided: GuidedModes = field(default_factory=GuidedModes)
    image_temperature: float | None = None  # how it draws by default; None: llm_cxr.configs.IMAGE_TEMPERATURE
    image_guidance: float | None = None  # its default classifier-free guidance scale for drawings; None: 1 (off)
    format: int = RUN_FORMAT
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.guided, dict):
            self.guided = from_dict_strict(GuidedModes, self.guided, "guided")

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
    def load(cls, folder: Path) -> RunInfo:
        """run.json; one written before format 2 (guided modes as ``extra`` flags, no add-on list) is converted."""
        path = folder / RUN_FILE
        if not path.exists():
            raise ConfigError(f"{folder} has no {RUN_FILE}: it is not an llm-cxr language-model run")
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if "format" not in doc:  # format 1
                extra = dict(doc.get("extra") or {})
                doc["guided"] = {new: bool(extra.pop(old, False)) for old, new in _LEGACY_GUIDED.items()}
                doc["extra"], doc["format"], doc["addons"] = extra, 1, None
            if doc["format"] > RUN_FORMAT:
                raise ConfigError(f"{path} was written by a newer llm-cxr (run format {doc['format']}, this one "
                                  f"reads up to {RUN_FORMAT}); upgrade llm-cxr")
            return cls(**doc)
        except (TypeError, KeyError, json.JSONDecodeError) as e:
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
    if (run / "checkpoints").is_dir() and not (run / "DONE").exists():
        raise ConfigError(f"{run} is an unfinished training run that has saved no model yet (no model/{RUN_FILE}); "
                          f"rerun its training command with the same --out to finish it")
    raise ConfigError(f"{run} is not an llm-cxr language-model run (no {RUN_FILE}, no model/{RUN_FILE}); "
                      f"train one with `llm-cxr train`")


def save_model(model, tokenizer, token_map: ImageTokenMap | None, info: RunInfo, folder: str | Path,
               addons: Sequence[AddOn] = ()) -> Path:
    """Write adapter or full weights, tokenizer, token map, the add-ons (those on the model's embeddings and
    ``addons`` beside it, e.g. the finding head) and run.json into ``folder`` (replacing what was there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with detached(model) as wrapper:  # transformers/peft see the plain model's parameter names
        # a peft adapter on a model whose vocabulary grew must carry the resized embedding matrices; saying so
        # explicitly is what peft's "Setting save_embedding_layers to True" warning asks for
        model.save_pretrained(folder, **({"save_embedding_layers": True} if hasattr(model, "peft_config") else {}))
    every = sorted([*(wrapper.addons if wrapper is not None else []), *addons], key=lambda a: ORDER.index(a.name))
    for stale in [*folder.glob(addon_file("*")), folder / POSITIONS_FILE, folder / LEGACY_HEAD_FILE]:
        stale.unlink(missing_ok=True)
    for addon in every:
        save_addon(addon, folder)
    tokenizer.save_pretrained(folder)
    if token_map is not None:
        token_map.save(folder)
    info.addons, info.format = [record(a) for a in every], RUN_FORMAT
    info.save(folder)
    return folder


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    token_map: ImageTokenMap
    info: RunInfo
    folder: Path
    addons: dict[str, AddOn] = field(default_factory=dict)  # by name, those on the embeddings and beside them


def load_addons(info: RunInfo, folder: Path) -> list[AddOn]:
    """The run's add-ons in run.json's order; a format-1 run's files are converted."""
    if info.addons is not None:
        return [load_addon(entry, folder) for entry in info.addons]
    legacy = load_legacy_positions(folder)
    head = load_head(folder)
    return legacy + ([head] if head is not None else [])


def load_run(run: str | Path, dtype: torch.dtype | None = None, merge: bool = False,
             device: str | torch.device | None = None, trainable: bool = False,
             attn_implementation: str | None = "sdpa") -> LoadedRun:
    """Load a trained run in one call: model (adapter applied, or merged) with its add-ons, tokenizer, token map.

    ``trainable=True`` keeps the adapter trainable (a next stage continues it).
    """
    folder = model_dir(run)
    check_finished(folder, "language-model")
    info = RunInfo.load(folder)
    token_map = ImageTokenMap.load(folder)
    tok = ensure_pad_token(load_tokenizer(str(folder)))
    model = _load_weights(folder, info, token_map, dtype, merge, trainable, attn_implementation)
    if len(tok) != token_map.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {len(tok)} tokens, image_tokens.json expects "
                          f"{token_map.vocab_size}")
    addons = load_addons(info, folder)
    for addon in addons:
        addon.attach(model, token_map)
    if not trainable:
        model.eval()
        for addon in addons:
            addon.eval()
    if device is not None:
        model.to(device)
        for addon in addons:
            addon.to(device)
    return LoadedRun(model, tok, token_map, info, folder, {a.name: a for a in addons})


def _load_weights(folder: Path, info: RunInfo, token_map: ImageTokenMap, dtype, merge: bool, trainable: bool,
                  attn_implementation: str | None):
    from transformers import AutoModelForCausalLM

    if info.kind == "full":
        return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation,
                                                    **({"dtype": dtype} if dtype else {}))
    if info.kind != "lora":
        raise ConfigError(f"{folder / RUN_FILE}: unknown kind {info.kind!r} (expected 'lora' or 'full')")
    from peft import PeftModel

    model, base_tok = load_causal_lm(info.resolve("base", folder), dtype=dtype,
                                     attn_implementation=attn_implementation)
    made = add_image_tokens(base_tok, model, token_map.n_codes, token_map.grid_size, token_map.vqgan_fingerprint)
    if made.first_id != token_map.first_id or made.vocab_size != token_map.vocab_size:
        raise ConfigError(f"the base model {info.base} gives image tokens at {made.first_id} (vocabulary "
                          f"{made.vocab_size}), the run was trained with {token_map.first_id} "
                          f"({token_map.vocab_size}): the base model changed")
    with peft_wrapping():
        model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    return model.merge_and_unload() if merge else model


@contextlib.contextmanager
def peft_wrapping():
    """Around peft's model wrapping only: peft (0.21, ``PeftModel.__init__``) reads transformers 5's deprecated
    ``is_gradient_checkpointing``, whose FutureWarning every command printed; the cause is in peft, so the one
    warning is silenced here and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def merge_run(run: str | Path, out: str | Path) -> Path:
    """Merge a LoRA run into its base and write a self-contained ``full`` run folder."""
    loaded = load_run(run, merge=True)
    if loaded.info.kind != "lora":
        raise ConfigError(f"{loaded.folder} holds full weights already; nothing to merge")
    info = RunInfo(**{**asdict(loaded.info), "kind": "full", "extra": {**loaded.info.extra,
                                                                       "merged_from": str(loaded.folder)}})
    beside = [a for a in loaded.addons.values() if a.name == "finding_head"]  # not on the LM: it travels beside it
    return save_model(loaded.model, loaded.tokenizer, loaded.token_map, info, out, addons=beside)
