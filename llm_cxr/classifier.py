"""A small CNN that recognises findings in chest X-rays (multi-label, one logit per finding).

Used to check that findings survive VQ-GAN reconstruction, to score generated images
against the findings a report asked for, and, exported to TorchScript, as the frozen
feature network of the VQ-GAN's clinical feature loss (as LLM-CXR used a CXR classifier).

It is not one of the LM's add-ons and does not share their trunk (llm_cxr.lm.addons.reader.CodeCNN) on
purpose: it reads pixels, not codes, so that it can judge an image whatever tokenizer made it, and it must stay
independent of the model it grades (a judge trained on the codes would share the tokenizer's blind spots).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm_cxr.data.schema import FINDING_NAMES, findings_from_json
from llm_cxr.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    labels: tuple[str, ...] = FINDING_NAMES
    resolution: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        self.labels, self.channels = tuple(self.labels), tuple(self.channels)
        if not self.labels or not self.channels or self.resolution < 16:
            raise ConfigError(f"invalid classifier config: {self}")


class FindingClassifier(nn.Module):
    """(B, 1, R, R) in [-1, 1] -> (B, L) logits. ``features(x)`` returns the stage outputs."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        stages, c_in = [], 1
        for c in config.channels:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in * 2, len(config.labels))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) -> (B, 2 * channels[-1]): the pooled features the head reads (for Frechet distances)."""
        h = self.features(x)[-1]
        return torch.cat([F.adaptive_avg_pool2d(h, 1), F.adaptive_max_pool2d(h, 1)], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def predict(self, x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        with torch.inference_mode():
            return (torch.sigmoid(self(x)) >= threshold).long()

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({**asdict(self.config), **(extra or {})}, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FindingClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} is not a classifier folder (config.json missing)")
        d = json.loads((path / "config.json").read_text())
        cfg = ClassifierConfig(**{k: v for k, v in d.items() if k in {f.name for f in fields(ClassifierConfig)}})
        model = cls(cfg)
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return model.eval()

    def export_feature_net(self, path: str | Path) -> Path:
        """``features`` as a ``torch.export`` program (.pt2) for the VQ-GAN's feature loss."""
        wrapper = _FeatureNet(self).eval()
        r = self.config.resolution
        example = (torch.zeros(2, 1, r, r),)
        program = torch.export.export(wrapper, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(path))
        return Path(path)


class _FeatureNet(nn.Module):
    def __init__(self, clf: FindingClassifier) -> None:
        super().__init__()
        self.stages = clf.stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return tuple(out)


def targets_from_findings(findings_json: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1 matrix of which labels each study has."""
    index = {n: i for i, n in enumerate(labels)}
    y = np.zeros((len(findings_json), len(labels)), np.float32)
    for r, text in enumerate(findings_json):
        for f in findings_from_json(text):
            if f.name in index:
                y[r, index[f.name]] = 1.0
    return y


@dataclass
class ClassifierTrainConfig:
    data: str
    out: str
    resolution: int = 128
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    augment: bool = True
    progress: bool = True
    channels: tuple[int, ...] = field(default=(16, 32, 64, 128))


def _image_tensor(ds, resolution: int, progress: bool) -> torch.Tensor:
    from llm_cxr.vqgan.data import ImageTensorDataset, to_unit_range

    cache = ImageTensorDataset(ds, resolution, 1, progress=progress, preload=True).cache
    return to_unit_range(cache)


def train_classifier(cfg: ClassifierTrainConfig) -> dict[str, Any]:
    """Train on the train split, pick thresholds on val, report accuracy on test."""
    from tqdm.auto import tqdm

    from llm_cxr.data.dataset import load_dataset

    torch.manual_seed(cfg.seed)
    model = FindingClassifier(ClassifierConfig(resolution=cfg.resolution, channels=cfg.channels))
    labels = model.config.labels
    split = {s: load_dataset(cfg.data, split=s) for s in ("train", "val", "test")}
    x = {s: _image_tensor(d, cfg.resolution, cfg.progress) for s, d in split.items()}
    y = {s: torch.from_numpy(targets_from_findings(d["findings"], labels)) for s, d in split.items()}
    pos = y["train"].mean(0).clamp(0.01, 0.99)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n = len(x["train"])
    steps = cfg.epochs * max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc="classifier", disable=not cfg.progress)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = x["train"][idx]
            if cfg.augment:  # small shifts and exposure changes; never flips (laterality matters)
                xb = _augment(xb, g)
            loss = loss_fn(model(xb), y["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    thresholds = _fit_thresholds(predict_proba(model, x["val"]), y["val"])
    metrics = evaluate_classifier(model, x["test"], y["test"], thresholds)
    model.save_pretrained(cfg.out, {"thresholds": thresholds.tolist()})
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    shift = torch.randint(-4, 5, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    return (x * gain).clamp(-1, 1)


def predict_proba(model: FindingClassifier, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.sigmoid(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def _fit_thresholds(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-label threshold maximising F1 on validation data (0.5 where a label is absent)."""
    grid = torch.linspace(0.05, 0.95, 19)
    best = torch.full((p.shape[1],), 0.5)
    for j in range(p.shape[1]):
        if y[:, j].sum() == 0:
            continue
        f1s = []
        for t in grid:
            pred = p[:, j] >= t
            tp = (pred & (y[:, j] == 1)).sum().item()
            fp = (pred & (y[:, j] == 0)).sum().item()
            fn = (~pred & (y[:, j] == 1)).sum().item()
            f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
        best[j] = grid[int(np.argmax(f1s))]
    return best


def load_thresholds(path: str | Path) -> torch.Tensor:
    d = json.loads((Path(path) / "config.json").read_text())
    return torch.tensor(d.get("thresholds") or [0.5] * len(d["labels"]))


def evaluate_classifier(model: FindingClassifier, x: torch.Tensor, y: torch.Tensor,
                        thresholds: torch.Tensor) -> dict[str, Any]:
    """Label accuracy (all labels of all images), exact-match and micro-F1."""
    pred = (predict_proba(model, x) >= thresholds).float()
    tp = (pred * y).sum().item()
    fp = (pred * (1 - y)).sum().item()
    fn = ((1 - pred) * y).sum().item()
    return {"n": len(x), "label_accuracy": (pred == y).float().mean().item(),
            "exact_match": (pred == y).all(1).float().mean().item(),
            "micro_f1": 2 * tp / max(1.0, 2 * tp + fp + fn)}
