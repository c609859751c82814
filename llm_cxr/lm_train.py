"""Training the language model: report-text pretraining of the embedded base, and the multimodal stages.

One loop serves both, on accelerate (one process, several, GPUs; bf16 autocast; gradient
accumulation and checkpointing). Only the trainable parameters go into a checkpoint (with
LoRA a few MB), together with the optimizer, the data position and the RNG, written
atomically; rerunning the same command resumes. ``metrics.csv`` logs loss, eval loss,
learning rate and tokens/s; ``model/`` is what inference loads.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_cxr import imagepos
from llm_cxr.configs import from_dict_strict, read_yaml_config, run_versions
from llm_cxr.diagnosis import HEAD_FILE
from llm_cxr.errors import ConfigError
from llm_cxr.instruct import LengthGroupedBatches, StageConfig, build_stage_dataset, iterate_batches, lengths_of
from llm_cxr.modeling import (LoraSettings, RunInfo, apply_lora, load_causal_lm, load_run, pick_attention,
                              save_model, trainable_summary)
from llm_cxr.modeling import model_dir as run_model_dir
from llm_cxr.prompts import NAMES, PLAN_ITEMS
from llm_cxr.tokens import add_image_tokens, init_image_rows_from_codebook

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
# eval_loss_read: eval loss of the examples with an image in the prompt (reports, answers); eval_loss_swapped: the
# same examples with their images rotated between the examples of each batch. Swapped rises above read once the
# model reads the images (equal = the answers ignore the image)
METRICS = ["step", "epoch", "loss", "eval_loss", "eval_loss_read", "eval_loss_swapped", "lr", "tokens_per_s",
           "seconds"]


@dataclass
class LoopConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    loss: str = "token"  # "token": the mean over the batch's response tokens (a 258-token image outweighs a one-word
    #                      answer 258 to 1); "example": each example's response tokens averaged first, so every
    #                      example weighs the same
    max_minutes: float | None = None  # stop (resumably) after this long
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch_size and grad_accum must be > 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("token", "example"):
            raise ConfigError(f"loop.loss must be 'token' or 'example', got {self.loss!r}")


def response_loss(model, batch: dict, mode: str = "token", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the response tokens. ``mode`` "token": their mean over the batch; "example": averaged over
    each example's response tokens first, then over the examples that have any. ``weights`` (B, T, aligned with
    ``labels``; :func:`llm_cxr.instruct.collate`) make those means weighted ones."""
    if mode == "token" and weights is None:
        return model(**batch).loss
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    w = (target != -100).float()
    if weights is not None:
        w = w * weights[:, 1:].to(w)
    if mode == "token":
        return (per_token * w).sum() / w.sum().clamp_min(1e-9)
    n = w.sum(1)
    return ((per_token * w).sum(1)[n > 0] / n[n > 0]).mean()


def lr_at(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed (micro-batches)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(run: Path, model, opt, pos: _Position, accelerator) -> None:
    if not accelerator.is_main_process:
        return
    path = run / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"position": asdict(pos), "trainable": _trainable_state(accelerator.unwrap_model(model)),
               "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint whole


def _load_checkpoint(run: Path, model, opt) -> _Position | None:
    path = run / CHECKPOINT
    if not path.exists():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in ck["trainable"] if n not in params]
    if missing:
        raise ConfigError(f"{path} does not fit this model (e.g. {missing[:3]}); resume with the same config "
                          f"or choose a new --out")
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(t.to(params[n].device))
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["torch_rng"])
    pos = _Position(**ck["position"])
    log.info("resumed %s at step %d", run, pos.step)
    return pos


def _tidy_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (the checkpoint a kill fell back to); bring an older header up to date."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f)) or [[]]
    keep = [dict(zip(header, r)) for r in rows if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows) and header == METRICS:
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, METRICS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)


def swap_prompt_images(batch: dict, token_map) -> tuple[dict, dict] | None:
    """The rows of ``batch`` that have an image in the prompt (image tokens that are not targets), as they are
    and with those images rotated by one between them; None if fewer than two rows have one. Each image moves
    whole, so only the pairing of image and text changes."""
    ids, labels = batch["input_ids"], batch["labels"]
    in_prompt = token_map.is_image_id(ids) & (labels == -100)
    rows = (in_prompt.sum(1) == token_map.tokens_per_image).nonzero().squeeze(1)
    if len(rows) < 2:
        return None
    sub = {k: v[rows] for k, v in batch.items()}
    mask = in_prompt[rows]
    images = sub["input_ids"][mask].view(len(rows), -1)
    swapped = sub["input_ids"].clone()
    swapped[mask] = images.roll(1, dims=0).reshape(-1)
    return sub, {**sub, "input_ids": swapped}


def _has_plan(model) -> bool:
    wrapper = imagepos.find(model)
    return wrapper is not None and wrapper.plan is not None


@torch.no_grad()
def evaluate_loss(model, eval_ds, pad_id: int, cfg: LoopConfig, accelerator,
                  token_map=None) -> tuple[float, float, float]:
    """Mean response-token loss over up to ``eval_batches`` batches of each process's shard; with a
    ``token_map`` also the loss of the examples that have an image in the prompt, as they are and with
    those images swapped between examples; nan where there is nothing to measure."""
    if eval_ds is None or len(eval_ds) == 0:
        return float("nan"), float("nan"), float("nan")
    sampler = LengthGroupedBatches(lengths_of(eval_ds), cfg.batch_size, seed=0, rank=accelerator.process_index,
                                   world=accelerator.num_processes)
    model.eval()
    total = torch.zeros(6, device=accelerator.device)  # (loss sum, tokens): all, prompt-image rows, swapped

    def summed(b, plan=None):
        with accelerator.autocast(), imagepos.responses(model, b["labels"], plan):
            loss = model(**b).loss.float()
        n = (b["labels"][:, 1:] != -100).sum()
        return torch.stack([loss * n, n.float()])

    for i, (_, _, batch) in enumerate(iterate_batches(eval_ds, sampler, pad_id, plan=_has_plan(model))):
        if i >= min(cfg.eval_batches, len(sampler)):
            break
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        plan = batch.pop("plan", None)
        batch.pop("weights", None)  # eval loss stays the plain mean, comparable across settings
        total[:2] += summed(batch, plan)  # the rows with a prompt image below draw no image: no plan
        pair = swap_prompt_images(batch, token_map) if token_map is not None else None
        if pair is not None:
            total[2:4] += summed(pair[0])
            total[4:] += summed(pair[1])
    model.train()
    total = accelerator.reduce(total, reduction="sum")

    def mean(i):
        return float(total[i] / total[i + 1]) if float(total[i + 1]) > 0 else float("nan")

    return mean(0), mean(2), mean(4)


def train_loop(model, train_ds, eval_ds, pad_id: int, cfg: LoopConfig, run: Path, accelerator,
               desc: str = "train", token_map=None) -> _Position:
    """Train ``model`` (its ``requires_grad`` parameters) on tokenised examples; resumable from ``run``."""
    from tqdm.auto import tqdm

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    pos = _load_checkpoint(run, model, opt) or _Position()
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # we batch ourselves, so DeepSpeed cannot infer the micro-batch from a DataLoader
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, opt = accelerator.prepare(model, opt)
    sampler = LengthGroupedBatches(lengths_of(train_ds), cfg.batch_size, seed=cfg.seed, grouped=cfg.group_by_length,
                                   rank=accelerator.process_index, world=accelerator.num_processes)
    batches = iterate_batches(train_ds, sampler, pad_id, start_epoch=pos.epoch, skip=pos.batch, plan=_has_plan(model))
    metrics_path = run / "metrics.csv"
    main = accelerator.is_main_process
    if main and metrics_path.exists():
        _tidy_metrics(metrics_path, pos.step)  # rows logged after the checkpoint a kill fell back to
    new_file = main and not metrics_path.exists()
    bar = tqdm(total=cfg.steps, initial=pos.step, desc=desc, disable=not (cfg.progress and main))
    t0 = time.monotonic()
    tokens = 0
    t_log = time.monotonic()
    model.train()
    with (open(metrics_path, "a", newline="") if main else open(os.devnull, "w")) as mf:
        writer = csv.writer(mf)
        if new_file:
            writer.writerow(METRICS)
        while pos.step < cfg.steps:
            lr = lr_at(pos.step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                epoch, b, batch = next(batches)
                pos.epoch, pos.batch = epoch, b + 1
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                plan = batch.pop("plan", None)
                weights = batch.pop("weights", None)
                with accelerator.autocast(), imagepos.responses(model, batch["labels"], plan):
                    loss = response_loss(model, batch, cfg.loss, weights)
                accelerator.backward(loss / cfg.grad_accum)
                loss_sum += float(loss.detach()) / cfg.grad_accum
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pos.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=pos.epoch)
            eval_loss = read_loss = swapped_loss = float("nan")
            if cfg.eval_every and (pos.step % cfg.eval_every == 0 or pos.step == cfg.steps):
                eval_loss, read_loss, swapped_loss = evaluate_loss(model, eval_ds, pad_id, cfg, accelerator, token_map)
                log.info("step %d: eval loss %.4f; examples with a prompt image %.4f, with their images swapped %.4f",
                         pos.step, eval_loss, read_loss, swapped_loss)
            if main and (pos.step % cfg.log_every == 0 or pos.step == cfg.steps or not math.isnan(eval_loss)):
                now = time.monotonic()
                tps = tokens * accelerator.num_processes / max(now - t_log, 1e-9)
                tokens, t_log = 0, now
                writer.writerow([pos.step, pos.epoch, f"{loss_sum:.5g}", _num(eval_loss), _num(read_loss), _num(swapped_loss),
                                 f"{lr:.3g}", f"{tps:.0f}", f"{now - t0:.1f}"])
                mf.flush()
            out_of_time = cfg.max_minutes is not None and time.monotonic() - t0 > 60 * cfg.max_minutes
            if pos.step % cfg.save_every == 0 or pos.step == cfg.steps or out_of_time:
                _save_checkpoint(run, model, opt, pos, accelerator)
            if out_of_time:
                log.warning("stopping at step %d: max_minutes=%s reached (rerun the same command to resume)",
                            pos.step, cfg.max_minutes)
                break
    bar.close()
    if main:
        _record_cost(run, time.monotonic() - t0, pos.step)
    accelerator.wait_for_everyone()
    return pos


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.5g}"


def _record_cost(run: Path, seconds: float, step: int) -> None:
    """``cost.json``: wall time of this invocation and peak memory (what a preset costs)."""
    import resource

    cost = {"seconds_this_invocation": round(seconds, 1), "step": step,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        cost["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    path = run / "cost.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    cost["seconds_total"] = round(old.get("seconds_total", 0.0) + seconds, 1)
    path.write_text(json.dumps(cost, indent=2) + "\n")


# --------------------------------------------------------------------------- multimodal stages


@dataclass
class LMTrainConfig:
    """A multimodal training stage (``llm-cxr train --config YAML``)."""

    data: str  # dataset with a `codes` column (`llm-cxr vqgan encode`)
    out: str
    base: str | None = None  # hub name or folder of a causal LM (e.g. from `llm-cxr lm pretrain`)
    init_from: str | None = None  # a previous stage's run to continue (its adapter or weights)
    stage: dict | StageConfig = field(default_factory=StageConfig)
    lora: dict | LoraSettings | None = field(default_factory=LoraSettings)
    full_finetune: bool = False  # train every weight (what LLM-CXR did) instead of LoRA
    # how new image-token rows start: "mean" of the text rows, or "codebook" (mean + a projection of
    # the VQ-GAN's codebook, so similar codes start similar; needs the VQ-GAN the data was encoded with)
    image_init: str = "mean"
    # "2d": a learned table of H*W position embeddings added to image tokens (where a code sits in the
    # grid; see llm_cxr/imagepos.py), saved with the run; "none": the LM's own sequence positions only
    image_positions: str = "2d"
    # "conv": a small CNN over the codebook vectors of each prompt image adds local features to its tokens
    # (llm_cxr/imagepos.py: CodeReader), first trained for reader_pretrain_epochs as a finding classifier on the
    # dataset's labels; needs image_positions: 2d and the VQ-GAN that encoded the data. "none": tokens only.
    image_reader: str = "none"
    reader_pretrain_epochs: float = 2.0
    # the reader also adds a summary of the whole image (its features max-pooled over 3x2 regions) to the
    # </image> token, where the text that follows finds it at one position
    reader_summary: bool = True
    # an image plan (llm_cxr/imagepos.py: ImagePlan): for report -> image examples that list their findings
    # (stage.image_guided), a learned map per finding and side adds "draw it here" to the drawn image's tokens;
    # generation gives it the findings the report asks for. Needs image_positions: 2d. A stage inherits it.
    image_plan: bool = False
    # "conv": a finding classifier over the codes (llm_cxr/diagnosis.py), trained for finding_head_epochs before the
    # LM and frozen; a checklist-guided report's prompt then states what it reads, with sides. A stage inherits its
    # init_from's head. "none": guided reports read the LM's own checklist answer.
    finding_head: str = "none"
    finding_head_epochs: float = 8.0
    # transformers' attention kernel: "auto" (eager for bf16 on CPU, where it is faster; SDPA elsewhere),
    # or any name transformers accepts ("sdpa", "eager", "flash_attention_2")
    attn_implementation: str = "auto"
    template: str = "compact"
    max_length: int = 512
    split: str = "train"
    eval_split: str = "val"
    num_proc: int = 1  # tokenisation workers
    loop: dict | LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if isinstance(self.stage, dict):
            self.stage = from_dict_strict(StageConfig, self.stage, "stage")
        if isinstance(self.loop, dict):
            self.loop = from_dict_strict(LoopConfig, self.loop, "loop")
        if isinstance(self.lora, dict):
            self.lora = from_dict_strict(LoraSettings, self.lora, "lora")
        if (self.base is None) == (self.init_from is None):
            raise ConfigError("give exactly one of base (a model to start from) and init_from (a previous stage run)")
        if self.image_positions not in ("2d", "none"):
            raise ConfigError(f"image_positions must be '2d' or 'none', got {self.image_positions!r}")
        if self.image_reader not in ("conv", "none"):
            raise ConfigError(f"image_reader must be 'conv' or 'none', got {self.image_reader!r}")
        if self.image_reader == "conv" and self.image_positions != "2d":
            raise ConfigError("image_reader: conv needs image_positions: 2d (the reader lives in the same wrapper)")
        if self.image_plan and self.image_positions != "2d":
            raise ConfigError("image_plan needs image_positions: 2d (the plan lives in the same wrapper)")
        if self.finding_head not in ("conv", "none"):
            raise ConfigError(f"finding_head must be 'conv' or 'none', got {self.finding_head!r}")
        if self.image_init not in ("mean", "codebook"):
            raise ConfigError(f"image_init must be 'mean' or 'codebook', got {self.image_init!r}")
        if not self.full_finetune and self.lora is None and self.init_from is None:
            raise ConfigError("lora is null and full_finetune is false: nothing would be trained")


def _merge(doc: dict, sets: dict) -> None:
    for k, v in sets.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            _merge(doc[k], v)
        else:
            doc[k] = v


def load_lm_config(path: str | None, sets: dict | None = None, **overrides: Any) -> LMTrainConfig:
    """A YAML file (keys of :class:`LMTrainConfig`; nested ``stage``/``lora``/``loop``) plus overrides.

    ``overrides`` are top-level or loop keys (None = not given); ``sets`` is a nested dict
    merged last (``--set stage.vqa=4``).
    """
    doc: dict[str, Any] = read_yaml_config(path) if path else {}
    source = str(path) if path else "command line"
    loop_keys = {f for f in LoopConfig.__dataclass_fields__}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in loop_keys:
            doc.setdefault("loop", {})[k] = v
        else:
            doc[k] = v
    _merge(doc, sets or {})
    if overrides.get("base") and "init_from" in doc and not overrides.get("init_from"):
        doc.pop("init_from")
    if overrides.get("init_from") and "base" in doc and not overrides.get("base"):
        doc.pop("base")
    for k in ("data", "out"):
        if k not in doc:
            raise ConfigError(f"{source}: the training config needs {k!r}")
    return from_dict_strict(LMTrainConfig, doc, "training", source)


def _start_model(cfg: LMTrainConfig, codes_info: dict, attn: str | None = None):
    """(model, tokenizer, token_map, kind, base, new reader): the base extended with image tokens, or the
    previous stage; with ``image_reader: conv`` a reader the run does not have yet is attached (untrained)
    and returned, so that the caller pretrains it; with ``image_plan`` an image plan (starting at zero)."""
    codebook = functools.partial(_codebook, codes_info, cfg.data)  # loaded only if needed, and then once
    model, tok, token_map, kind, base = _start_lm(cfg, codes_info, codebook, attn)
    reader = None
    if cfg.image_reader == "conv" and imagepos.find(model).reader is None:
        torch.manual_seed(cfg.loop.seed)
        reader = imagepos.CodeReader(codebook(), token_map.grid_size, imagepos.find(model).pos.shape[1],
                                     summary=cfg.reader_summary)
        imagepos.attach(model, token_map, reader=reader)
    wrapper = imagepos.find(model)
    if cfg.image_plan and wrapper.plan is None:
        torch.manual_seed(cfg.loop.seed)
        imagepos.attach(model, token_map, plan=imagepos.ImagePlan(PLAN_ITEMS, token_map.tokens_per_image,
                                                                  wrapper.pos.shape[1], row_std=wrapper.text_row_std()))
    return model, tok, token_map, kind, base, reader


def _start_lm(cfg: LMTrainConfig, codes_info: dict, codebook, attn: str | None = None):
    if cfg.init_from:
        prev = load_run(cfg.init_from, trainable=True, attn_implementation=attn)
        prev.token_map.check_vqgan(codes_info["n_embed"], codes_info["grid_size"], codes_info["fingerprint"],
                                   source=f"the VQ-GAN of {cfg.data}")
        if prev.info.kind == "full":
            prev.model.requires_grad_(True)
        if cfg.image_positions == "2d" and imagepos.find(prev.model) is None:
            imagepos.attach(prev.model, prev.token_map)  # the previous stage had none: start the table here
        return prev.model, prev.tokenizer, prev.token_map, prev.info.kind, prev.info.base
    model, tok = load_causal_lm(cfg.base, attn_implementation=attn)
    token_map = add_image_tokens(tok, model, codes_info["n_embed"], codes_info["grid_size"],
                                 codes_info["fingerprint"])
    if cfg.image_init == "codebook":
        init_image_rows_from_codebook(model, token_map, codebook(), seed=cfg.loop.seed)
    kind = "full" if cfg.full_finetune else "lora"
    if kind == "lora":
        model = apply_lora(model, token_map, cfg.lora)
    if cfg.image_positions == "2d":
        imagepos.attach(model, token_map)  # after peft, so its embedding wrapper sits inside ours
    return model, tok, token_map, kind, cfg.base


def reader_labels(rows) -> tuple[list[str], torch.Tensor]:
    """Finding names and an (N, L) tensor in {1, 0, -1 unknown} from a dataset's ``labels`` column
    (labels that never vary are dropped: nothing to learn from them)."""
    dicts = [r or {} for r in rows]
    names = sorted({k for d in dicts for k in d})
    y = torch.tensor([[(-1 if d.get(n) is None else int(d[n])) for n in names] for d in dicts], dtype=torch.long)
    keep = [i for i in range(len(names)) if (y[:, i] == 1).any() and (y[:, i] == 0).any()]
    if not keep:
        raise ConfigError("image_reader: conv is pretrained on the dataset's finding labels, but its `labels` "
                          "column has no finding that is present in some images and absent in others")
    return [names[i] for i in keep], y[:, keep]


def _pretrain_reader(model, token_map, cfg: LMTrainConfig, train_rows, progress: bool) -> None:
    """Train a new CodeReader as a finding classifier on the training split's labels before the LM stage."""
    wrapper = imagepos.find(model)
    names, y = reader_labels(train_rows["labels"])
    codes = _codes_of(train_rows)
    res = imagepos.pretrain_reader(wrapper.reader, codes, y, epochs=cfg.reader_pretrain_epochs, seed=cfg.loop.seed,
                                   progress=progress, target_std=wrapper.text_row_std())
    log.info("image reader pretrained on %d images, %d labels (%s): loss %.4f", len(codes), len(names),
             ", ".join(names), res["loss"])


def _codes_of(rows) -> torch.Tensor:
    """The ``codes`` column of dataset rows as (N, H*W) long."""
    return torch.as_tensor(np.asarray(rows.with_format("numpy")["codes"])).long().reshape(len(rows), -1)


def _codebook(codes_info: dict, data: str) -> torch.Tensor:
    """The codebook of the VQ-GAN that encoded ``data`` (checked against the recorded weights); loaded once
    for codebook init, the image reader and the finding head alike."""
    return _load_codebook(codes_info.get("model_path"), codes_info.get("weights"), data)


@functools.lru_cache(maxsize=2)
def _load_codebook(path: str | None, weights: str | None, data: str) -> torch.Tensor:
    from llm_cxr.vqgan.encode import weights_hash
    from llm_cxr.vqgan.model import VQGAN

    if not path or not Path(path).exists():
        raise ConfigError(f"image_init: codebook needs the VQ-GAN that encoded {data}, but its recorded path "
                          f"{path!r} does not exist (or use image_init: mean)")
    vq = VQGAN.from_pretrained(path)
    if weights and weights_hash(vq) != weights:
        raise ConfigError(f"the VQ-GAN at {path} is not the one that encoded {data} (weights differ)")
    return vq.quantize.embedding.weight.detach().float()


def train_lm(cfg: LMTrainConfig, accelerator=None) -> Path:
    """Run (or resume) one multimodal stage; returns the run folder."""
    from llm_cxr.accel import make_accelerator
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.vqgan.encode import read_codes_info

    loop = cfg.loop
    accelerator = accelerator or make_accelerator(loop.mixed_precision)
    torch.manual_seed(loop.seed)
    codes_info = read_codes_info(cfg.data)
    run = Path(cfg.out)
    attn = pick_attention(cfg.attn_implementation, accelerator.device, loop.mixed_precision)
    model, tok, token_map, kind, base, new_reader = _start_model(cfg, codes_info, attn)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and context < cfg.max_length:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the model's context "
                          f"({model.config.max_position_embeddings})")
    summary = trainable_summary(model)
    _init_run(run, cfg, summary, accelerator)
    with accelerator.main_process_first():
        ds = load_dataset(cfg.data)
        train_rows = ds.filter(lambda s: s == cfg.split, input_columns="split")
        train = build_stage_dataset(train_rows, tok, token_map, cfg.stage, cfg.template, cfg.max_length, loop.seed,
                                    cfg.num_proc)
        ev_rows = ds.filter(lambda s: s == cfg.eval_split, input_columns="split")
        ev = build_stage_dataset(ev_rows, tok, token_map, cfg.stage, cfg.template, cfg.max_length, loop.seed + 1,
                                 cfg.num_proc) if len(ev_rows) else None
    if len(train) == 0:
        raise ConfigError(f"{cfg.data} has no rows in split {cfg.split!r}")
    if accelerator.is_main_process:  # the head is not part of the LM: one process trains it, the others never use it
        _prepare_finding_head(cfg, run, train_rows, ev_rows, codes_info, token_map.grid_size, accelerator.device,
                              loop.progress)
    if new_reader is not None and not (run / CHECKPOINT).exists():  # on resume the checkpoint restores it
        _pretrain_reader(model, token_map, cfg, train_rows, progress=loop.progress and accelerator.is_main_process)
    log.info("%s: %d training examples, %s", run, len(train), summary)
    pos = train_loop(model, train, ev, tok.pad_token_id, loop, run, accelerator, desc=f"train {run.name}",
                     token_map=token_map)
    if accelerator.is_main_process:
        vq = codes_info.get("model_path")
        info = RunInfo(kind=kind, base=_abs(base), vqgan=_abs(vq) if vq else None, template=cfg.template,
                       max_length=cfg.max_length, extra={"vqgan_weights": codes_info.get("weights"),
                                                         "trainable": asdict(summary) | {"share": summary.share},
                                                         **_guided_modes(cfg),
                                                         **_relative_refs(run / "model", base, vq)})
        save_model(accelerator.unwrap_model(model), tok, token_map, info, run / "model")
        if (run / HEAD_FILE).exists():
            shutil.copyfile(run / HEAD_FILE, run / "model" / HEAD_FILE)
        if pos.step >= loop.steps:
            (run / "DONE").write_text(json.dumps({"steps": pos.step}) + "\n")
    accelerator.wait_for_everyone()
    return run


def _guided_modes(cfg: LMTrainConfig) -> dict[str, bool]:
    """``guided_reports`` / ``guided_vqa`` (the run writes reports / answers questions from its reading),
    ``guided_images`` (it draws from a report with the findings it states listed) and
    ``guide_sides`` (the reading gives sides): this stage trains them, or continues a stage that did and trains
    no plain reports / only guided questions."""
    st = cfg.stage
    prev = RunInfo.load(run_model_dir(cfg.init_from)).extra if cfg.init_from else {}
    reports = bool(st.report_guided or (not st.report and prev.get("guided_reports")))
    vqa = bool(st.vqa_guided or st.vqa_from_findings or (not st.vqa and prev.get("guided_vqa")))
    images = bool(st.image_guided or (not st.image and prev.get("guided_images")))
    if st.report_guided or st.vqa_guided or st.vqa_from_findings or st.image_guided:
        sides = st.guide_sides
    else:
        sides = bool(prev.get("guide_sides")) and (reports or vqa or images)
    return {"guided_reports": reports, "guided_vqa": vqa, "guided_images": images, "guide_sides": sides}


def _prepare_finding_head(cfg: LMTrainConfig, run: Path, train_rows, val_rows, codes_info: dict, grid: int, device,
                          progress: bool) -> None:
    """``run/finding_head.safetensors``: kept on resume, inherited from init_from, or trained (finding_head: conv)
    on the training split, its thresholds chosen on the evaluation split."""
    from llm_cxr import diagnosis

    if (run / HEAD_FILE).exists():
        return
    if cfg.init_from and (run_model_dir(cfg.init_from) / HEAD_FILE).exists():
        shutil.copyfile(run_model_dir(cfg.init_from) / HEAD_FILE, run / HEAD_FILE)
        return
    if cfg.finding_head != "conv":
        return
    cols = [c for c in ("findings", "labels", "source") if c in train_rows.column_names]
    if "findings" not in cols:
        raise ConfigError(f"finding_head: conv trains on the findings of {cfg.data}, which has no `findings` column")

    names, targets = diagnosis.usable(diagnosis.finding_targets(train_rows.select_columns(cols), list(NAMES)),
                                      list(NAMES))
    torch.manual_seed(cfg.loop.seed)
    head = diagnosis.FindingHead(_codebook(codes_info, cfg.data), grid, names).to(device)
    res = diagnosis.train_finding_head(head, _codes_of(train_rows), targets, cfg.finding_head_epochs,
                                       seed=cfg.loop.seed, progress=progress,
                                       autocast=cfg.loop.mixed_precision == "bf16")
    metrics = {"train_loss": res["loss"], "steps": res["steps"], "epochs": cfg.finding_head_epochs}
    if len(val_rows):
        metrics |= diagnosis.tune_thresholds(head, _codes_of(val_rows),
                                             diagnosis.finding_targets(val_rows.select_columns(cols), names))
    diagnosis.save_head(head.cpu(), run, metrics)
    log.info("finding head trained on %d images (%s): held-out micro-F1 %s, side accuracy %s", len(targets.present),
             ", ".join(names), metrics.get("micro_f1"), metrics.get("side_accuracy"))


def _relative_refs(model_folder: Path, base: str, vqgan: str | None) -> dict[str, str]:
    """Local base / VQ-GAN paths relative to the model folder, so a moved tree of runs still loads."""
    out = {}
    for key, ref in (("base_relative", base), ("vqgan_relative", vqgan)):
        if ref and Path(ref).exists():
            out[key] = os.path.relpath(Path(ref).resolve(), model_folder.resolve())
    return out


def _abs(ref: str) -> str:
    p = Path(ref)
    return str(p.resolve()) if p.exists() else ref


def _init_run(run: Path, cfg: LMTrainConfig, summary, accelerator) -> None:
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        resolved = asdict(cfg)
        saved = run / "config.json"
        if saved.exists() and (run / CHECKPOINT).exists():
            old = json.loads(saved.read_text())
            same = ("loop", "out")  # a run folder that was moved or copied still resumes
            if {k: v for k, v in old.items() if k not in same} != {k: v for k, v in resolved.items() if k not in same}:
                raise ConfigError(f"{run} holds a run with another config; resume with the same config or choose "
                                  f"a new --out")
        saved.write_text(json.dumps(resolved, indent=2) + "\n")
        (run / "versions.json").write_text(json.dumps(run_versions("transformers", "peft"), indent=2) + "\n")
        (run / "trainable.json").write_text(json.dumps({"trainable": summary.trainable, "total": summary.total,
                                                        "share": summary.share}, indent=2) + "\n")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the embedded base LM


@dataclass
class PretrainConfig:
    """Report-text pretraining of the embedded GPT-NeoX (``llm-cxr lm pretrain``)."""

    data: str
    out: str
    preset: str = "small"
    split: str = "train"
    eval_split: str = "val"
    loop: dict | LoopConfig = field(default_factory=lambda: LoopConfig(steps=600, batch_size=32, lr=1e-3,
                                                                       warmup_steps=30, eval_every=200))

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = from_dict_strict(LoopConfig, self.loop, "loop")


def pretrain_base(cfg: PretrainConfig, accelerator=None) -> Path:
    """Train the report tokenizer and a small GPT-NeoX on the reports; the base is ``OUT/model``."""
    import datasets

    from llm_cxr.accel import make_accelerator
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.textlm import build_base_model, get_base_preset, train_text_tokenizer

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
