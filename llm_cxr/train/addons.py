"""Training the add-ons that are not trained with the LM's loss: the image reader's pretraining and the finding
head (trained once before a stage, thresholds tuned on the validation split, then frozen)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from llm_cxr.accel import effective_precision
from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons.head import HEAD_FILE, FindingHead, _side, load_head, save_head, side_bits
from llm_cxr.lm.addons.positions import find
from llm_cxr.lm.addons.reader import CodeReader
from llm_cxr.lm.prompts import NAMES, checklist_scope, guide_items, split_item
from llm_cxr.lm.run import model_dir as run_model_dir
from llm_cxr.rng import seeded
from llm_cxr.train.config import LMTrainConfig
from llm_cxr.train.edits import CodeEdits

log = logging.getLogger(__name__)


def fit_on_codes(params: list, loss_of, n: int, epochs: float, batch_size: int, lr: float, seed: int, desc: str,
                 progress: bool = True, one_cycle: bool = False) -> dict:
    """The one training loop of the models over codebook vectors (the image reader's pretraining, the finding
    head): AdamW on ``params``, ``epochs * n / batch_size`` steps of ``loss_of(indices)`` on batches drawn with
    replacement (seeded), optionally a one-cycle schedule. Returns {"loss": last loss, "steps": n}."""
    from tqdm.auto import tqdm

    steps = max(1, int(epochs * n / batch_size))
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1) if one_cycle else None
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {"loss": float(loss.detach()), "steps": steps}


def pretrain_reader(reader: CodeReader, codes: torch.Tensor, labels: torch.Tensor, epochs: float = 2.0,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                    target_std: float | None = None) -> dict:
    """Train the reader's CNN as a multi-label finding classifier (max-pooled features -> one logit per
    label) on ``codes`` (N, H*W) and ``labels`` (N, L) in {1, 0, -1 = unknown, masked}; the head is then
    dropped. ``target_std``: scale ``proj`` so the reader's output starts at that spread (the embedding
    rows'), small next to them but not zero. Returns {"loss": last loss, "steps": n}."""
    if len(codes) == 0:
        raise ConfigError("no training images to pretrain the image reader on")
    device = reader.codebook.device
    head = nn.Linear(reader.n_features, labels.shape[1]).to(device)
    known = labels >= 0
    target = labels.clamp(min=0).float()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        logits = head(reader.features(codes[idx].to(device)).amax(dim=(2, 3)))
        per = nn.functional.binary_cross_entropy_with_logits(logits, target[idx].to(device), reduction="none")
        m = known[idx].to(device)
        return (per * m).sum() / m.sum().clamp(min=1)

    reader.train()
    res = fit_on_codes(list(reader.trunk.parameters()) + list(head.parameters()), loss_of, len(codes), epochs,
                       batch_size, lr, seed, "pretrain image reader", progress)
    if target_std is not None:
        with torch.no_grad():
            maps = reader.features(codes[:256].to(device))
            for proj, f in ((reader.proj, maps.flatten(2)), (reader.sum_proj, reader.pooled(maps))):
                if proj is None:
                    continue
                rms = float(f.pow(2).mean().sqrt().clamp(min=1e-6))
                nn.init.normal_(proj.weight, std=target_std / (rms * proj.in_features ** 0.5))
                nn.init.zeros_(proj.bias)
    return res


@dataclass
class FindingTargets:
    """Training targets, (N, K) each, in {1, 0, -1 = unknown (not trained on)}."""

    present: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


def finding_targets(rows, names: Sequence[str]) -> FindingTargets:
    """Targets from a dataset's ``findings`` (and, for real data, ``labels``: hedged or unread findings are
    unknown) columns: what the checklist asks and a guided prompt states (:func:`llm_cxr.lm.prompts.guide_items`).
    A side is known only for a present finding whose laterality was recorded."""
    K = len(names)
    index = {n: k for k, n in enumerate(names)}
    present = torch.full((len(rows), K), -1, dtype=torch.long)
    left, right = present.clone(), present.clone()
    for i, row in enumerate(rows):
        findings, askable, uncertain = checklist_scope(row)
        for n in askable:
            if n in index and n not in uncertain:
                present[i, index[n]] = 0
        for name, side in map(split_item, guide_items(findings, askable, uncertain, sides=True)):
            if name in index:
                present[i, index[name]] = 1
                if side:
                    left[i, index[name]], right[i, index[name]] = side_bits(side)
    return FindingTargets(present, left, right)


def usable(targets: FindingTargets, names: Sequence[str]) -> tuple[list[str], FindingTargets]:
    """The findings present in some training rows and absent in others (nothing to learn from the rest), and
    their targets."""
    keep = [k for k in range(len(names))
            if bool((targets.present[:, k] == 1).any()) and bool((targets.present[:, k] == 0).any())]
    if not keep:
        raise ConfigError("finding_head: conv needs findings that are present in some training images and absent "
                          "in others; the dataset's findings/labels have none")
    return [names[k] for k in keep], FindingTargets(targets.present[:, keep], targets.left[:, keep],
                                                    targets.right[:, keep])


def _masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = target >= 0
    per = nn.functional.binary_cross_entropy_with_logits(logits, target.clamp(min=0).float(), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


def train_finding_head(head: FindingHead, codes: torch.Tensor, targets: FindingTargets, epochs: float = 8.0,
                       batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                       autocast: bool = True, edits: CodeEdits | None = None) -> dict:
    """Train ``head`` on ``codes`` (N, H*W) (one-cycle schedule, bf16 autocast on CPU/CUDA when ``autocast``);
    marks which findings have sides. ``edits``: edit a share of each batch first (llm_cxr.train.edits). Returns
    {"loss", "steps"}."""
    if len(codes) == 0:
        raise ConfigError("no training images to train the finding head on")
    dev = head.codebook.device
    head.sided.copy_(((targets.left >= 0) | (targets.right >= 0)).any(0).to(dev))
    gen = torch.Generator().manual_seed(seed + 1)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        batch = (codes[idx], targets.present[idx], targets.left[idx], targets.right[idx])
        if edits is not None:
            batch = edits.apply(batch[0], idx, *batch[1:], gen)
        with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            out = head(batch[0].to(dev)).float()  # (B, 3, K)
        return sum(_masked_bce(out[:, j], t.to(dev)) for j, t in enumerate(batch[1:]))

    head.train()
    res = fit_on_codes(list(head.parameters()), loss_of, len(codes), epochs, batch_size, lr, seed,
                       "train finding head", progress, one_cycle=True)
    head.eval()
    return res


def tune_thresholds(head: FindingHead, codes: torch.Tensor, targets: FindingTargets,
                    grid: Sequence[float] = tuple(x / 20 for x in range(2, 19))) -> dict:
    """Per finding, the presence threshold with the best F1 on held-out ``codes``; findings the held-out rows
    never show keep 0.5. Returns the held-out micro-F1 before and after, and the side accuracy."""
    p = head.probabilities(codes)
    t = targets.present
    before = micro_f1(p[:, 0] >= 0.5, t)
    for k in range(len(head.names)):
        known = t[:, k] >= 0
        if not bool((t[known, k] == 1).any()):
            continue
        best = max(grid, key=lambda th: (_f1(p[known, 0, k] >= th, t[known, k] == 1), -abs(th - 0.5)))
        head.thresholds[k] = best
    pred = p[:, 0] >= head.thresholds.cpu()
    return {"micro_f1_at_0.5": before, "micro_f1": micro_f1(pred, t), "side_accuracy": side_accuracy(p, pred, targets),
            "thresholds": dict(zip(head.names, [round(float(x), 2) for x in head.thresholds]))}


def _f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = int((pred & truth).sum())
    return 2 * tp / max(1, 2 * tp + int((pred & ~truth).sum()) + int((~pred & truth).sum()))


def micro_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    known = target >= 0
    return _f1(pred[known], target[known] == 1)


def side_accuracy(p: torch.Tensor, pred: torch.Tensor, targets: FindingTargets) -> float | None:
    """Share of correctly found findings with a known side whose side (left / right / bilateral) is right."""
    ok = n = 0
    hit = pred & (targets.present == 1) & (targets.left >= 0) & (targets.right >= 0)
    for i, k in hit.nonzero().tolist():
        truth = _side(float(targets.left[i, k]), float(targets.right[i, k]))
        ok += _side(float(p[i, 1, k]), float(p[i, 2, k])) == truth
        n += 1
    return ok / n if n else None


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
    wrapper = find(model)
    names, y = reader_labels(train_rows["labels"])
    codes = _codes_of(train_rows)
    res = pretrain_reader(wrapper.reader, codes, y, epochs=cfg.reader_pretrain_epochs, seed=cfg.loop.seed,
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


def _prepare_finding_head(cfg: LMTrainConfig, run: Path, train_rows, val_rows, codes_info: dict, grid: int, device,
                          progress: bool) -> None:
    """``run/addon_finding_head.safetensors``: kept on resume, inherited from init_from, or trained (finding_head: conv)
    on the training split, its thresholds chosen on the evaluation split."""

    if (run / HEAD_FILE).exists():
        return
    inherited = load_head(run_model_dir(cfg.init_from)) if cfg.init_from else None
    if inherited is not None:  # also from a run saved before add-ons had a registry
        save_head(inherited, run)
        return
    if cfg.finding_head != "conv":
        return
    cols = [c for c in ("findings", "labels", "source") if c in train_rows.column_names]
    if "findings" not in cols:
        raise ConfigError(f"finding_head: conv trains on the findings of {cfg.data}, which has no `findings` column")

    names, targets = usable(finding_targets(train_rows.select_columns(cols), list(NAMES)), list(NAMES))
    with seeded(cfg.loop.seed):
        head = FindingHead(_codebook(codes_info, cfg.data), grid, names).to(device)
    edits = CodeEdits.from_rows(train_rows, names, grid, cfg.finding_head_edits)
    if cfg.finding_head_edits > 0 and edits is None:
        log.warning("finding_head_edits: %s has no masks column, so the finding head trains on whole images only",
                    cfg.data)
    res = train_finding_head(head, _codes_of(train_rows), targets, cfg.finding_head_epochs, seed=cfg.loop.seed,
                             progress=progress, edits=edits,
                             autocast=effective_precision(cfg.loop.mixed_precision, device) == "bf16")
    metrics = {"train_loss": res["loss"], "steps": res["steps"], "epochs": cfg.finding_head_epochs,
               "edits": cfg.finding_head_edits if edits is not None else 0.0}
    if len(val_rows):
        metrics |= tune_thresholds(head, _codes_of(val_rows),
                                             finding_targets(val_rows.select_columns(cols), names))
    save_head(head.cpu(), run, metrics)
    log.info("finding head trained on %d images (%s): held-out micro-F1 %s, side accuracy %s", len(targets.present),
             ", ".join(names), metrics.get("micro_f1"), metrics.get("side_accuracy"))
