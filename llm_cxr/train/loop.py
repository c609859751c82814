"""The training loop: one loop for base pretraining and every multimodal stage.

It runs on accelerate (one process, several, GPUs; bf16 autocast; gradient accumulation and checkpointing) and
computes every loss through :meth:`llm_cxr.lm.model.CXRModel.forward`. Only the trainable parameters go into a
checkpoint (with LoRA a few MB), together with the optimizer, the data position and the RNG, written atomically;
rerunning the same command resumes. ``metrics.csv`` logs loss, eval loss, learning rate and tokens/s.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_cxr.errors import ConfigError
from llm_cxr.files import save_atomic
from llm_cxr.lm.addons.positions import find
from llm_cxr.lm.model import CXRModel, response_loss
from llm_cxr.lm.sequence import Batch
from llm_cxr.train.batching import LengthGroupedBatches, iterate_batches, lengths_of
from llm_cxr.train.config import LoopConfig

log = logging.getLogger(__name__)


CHECKPOINT = "checkpoints/last.pt"


# eval_loss_read: eval loss of the examples with an image in the prompt (reports, answers); eval_loss_swapped: the
# same examples with their images rotated between the examples of each batch. Swapped rises above read once the
# model reads the images (equal = the answers ignore the image)
METRICS = ["step", "epoch", "loss", "eval_loss", "eval_loss_read", "eval_loss_swapped", "lr", "tokens_per_s",
           "seconds"]


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


def _lm(model):
    """The LM inside a CXRModel: checkpoints use the LM's own parameter names."""
    return model.lm if isinstance(model, CXRModel) else model


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in _lm(model).named_parameters() if p.requires_grad}


def _save_checkpoint(run: Path, model, opt, pos: _Position, accelerator) -> None:
    if not accelerator.is_main_process:
        return
    path = run / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"position": asdict(pos), "trainable": _trainable_state(accelerator.unwrap_model(model)),
               "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    save_atomic(path, lambda f: torch.save(payload, f))  # a kill or a full disk leaves the previous one whole


def _load_checkpoint(run: Path, model, opt) -> _Position | None:
    path = run / CHECKPOINT
    if not path.exists():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(_lm(model).named_parameters())
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


def swap_prompt_images(batch: Batch, token_map) -> tuple[Batch, Batch] | None:
    """The rows of ``batch`` that have an image in the prompt (image tokens that are not targets), as they are
    and with those images rotated by one between them; None if fewer than two rows have one. Each image moves
    whole, so only the pairing of image and text changes."""
    ids, labels = batch.input_ids, batch.labels
    in_prompt = token_map.is_image_id(ids) & (labels == -100)
    rows = (in_prompt.sum(1) == token_map.tokens_per_image).nonzero().squeeze(1)
    if len(rows) < 2:
        return None
    sub = batch.rows(rows)
    mask = in_prompt[rows]
    images = sub.input_ids[mask].view(len(rows), -1)
    swapped = sub.input_ids.clone()
    swapped[mask] = images.roll(1, dims=0).reshape(-1)
    return sub, sub.with_ids(swapped, token_map)


def _has_plan(model) -> bool:
    wrapper = find(model)
    return wrapper is not None and wrapper.plan is not None


@torch.no_grad()
def evaluate_loss(model, eval_ds, pad_id: int, cfg: LoopConfig, accelerator,
                  token_map=None) -> tuple[float, float, float]:
    """Mean response-token loss over up to ``eval_batches`` batches of each process's shard; with a
    ``token_map`` also the loss of the examples that have an image in the prompt, as they are and with
    those images swapped between examples; nan where there is nothing to measure. Unweighted (``weights`` and
    ``loop.loss`` aside), so that it stays comparable across settings."""
    if eval_ds is None or len(eval_ds) == 0:
        return float("nan"), float("nan"), float("nan")
    sampler = LengthGroupedBatches(lengths_of(eval_ds), cfg.batch_size, seed=0, rank=accelerator.process_index,
                                   world=accelerator.num_processes)
    model.eval()
    total = torch.zeros(6, device=accelerator.device)  # (loss sum, tokens): all, prompt-image rows, swapped

    def summed(b: Batch):
        b = Batch(b.input_ids, b.attention_mask, b.image, b.labels, None, b.n_prompt)
        with accelerator.autocast():
            loss = response_loss(model, b)
        n = (b.labels[:, 1:] != -100).sum()
        return torch.stack([loss * n, n.float()])

    batches = iterate_batches(eval_ds, sampler, pad_id, plan=_has_plan(model), token_map=token_map)
    for i, (_, _, batch) in enumerate(batches):
        if i >= min(cfg.eval_batches, len(sampler)):
            break
        batch = batch.to(accelerator.device)
        total[:2] += summed(batch)
        pair = swap_prompt_images(batch, token_map) if token_map is not None else None
        if pair is not None:
            total[2:4] += summed(pair[0])
            total[4:] += summed(pair[1])
    model.train()
    total = accelerator.reduce(total, reduction="sum")

    def mean(i):
        return float(total[i] / total[i + 1]) if float(total[i + 1]) > 0 else float("nan")

    return mean(0), mean(2), mean(4)


def _optimizer(params: list, cfg: LoopConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95, as GPT-NeoX/Pythia trained) with weight decay on matrices only."""
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _train_step(model, opt, params: list, batches, pos: _Position, lr: float, cfg: LoopConfig,
                accelerator) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``pos``. Returns (mean loss, tokens seen)."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for _ in range(cfg.grad_accum):
        epoch, b, batch = next(batches)
        pos.epoch, pos.batch = epoch, b + 1
        batch = batch.to(accelerator.device)
        tokens += int(batch.attention_mask.sum())
        with accelerator.autocast():
            loss = response_loss(model, batch, cfg.loss)
        accelerator.backward(loss / cfg.grad_accum)
        loss_sum += float(loss.detach()) / cfg.grad_accum
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    pos.step += 1
    return loss_sum, tokens


def train_loop(model, train_ds, eval_ds, pad_id: int, cfg: LoopConfig, run: Path, accelerator,
               desc: str = "train", token_map=None) -> _Position:
    """Train ``model`` (its ``requires_grad`` parameters) on tokenised examples; resumable from ``run``. ``model``:
    a :class:`~llm_cxr.lm.model.CXRModel`, or a plain causal LM (wrapped here, text only)."""
    from tqdm.auto import tqdm

    if not isinstance(model, CXRModel):
        model = CXRModel(model, token_map)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.lm, "enable_input_require_grads"):
            model.lm.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    pos = _load_checkpoint(run, model, opt) or _Position()
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # we batch ourselves, so DeepSpeed cannot infer the micro-batch from a DataLoader
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, opt = accelerator.prepare(model, opt)
    sampler = LengthGroupedBatches(lengths_of(train_ds), cfg.batch_size, seed=cfg.seed, grouped=cfg.group_by_length,
                                   rank=accelerator.process_index, world=accelerator.num_processes)
    batches = iterate_batches(train_ds, sampler, pad_id, start_epoch=pos.epoch, skip=pos.batch,
                              plan=_has_plan(model), token_map=token_map)
    metrics_path = run / "metrics.csv"
    main = accelerator.is_main_process
    if main:
        # the caller rewrites the model folder after the loop and then marks the run DONE again if it reached its
        # steps; until then a DONE left by an earlier (shorter) run would vouch for a model being replaced
        (run / "DONE").unlink(missing_ok=True)
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
            loss_sum, n_tokens = _train_step(model, opt, params, batches, pos, lr, cfg, accelerator)
            tokens += n_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=pos.epoch, refresh=False)
            eval_loss = read_loss = swapped_loss = float("nan")
            if cfg.eval_every and (pos.step % cfg.eval_every == 0 or pos.step == cfg.steps):
                eval_loss, read_loss, swapped_loss = evaluate_loss(model, eval_ds, pad_id, cfg, accelerator, token_map)
                log.info("step %d: eval loss %.4f; examples with a prompt image %.4f, with their images swapped %.4f",
                         pos.step, eval_loss, read_loss, swapped_loss)
            if main and (pos.step % cfg.log_every == 0 or pos.step == cfg.steps or not math.isnan(eval_loss)):
                now = time.monotonic()
                tps = tokens * accelerator.num_processes / max(now - t_log, 1e-9)
                tokens, t_log = 0, now
                writer.writerow([pos.step, pos.epoch, f"{loss_sum:.5g}", _num(eval_loss), _num(read_loss),
                                 _num(swapped_loss), f"{lr:.3g}", f"{tps:.0f}", f"{now - t0:.1f}"])
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
