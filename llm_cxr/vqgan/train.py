"""Train a VQ-GAN on an llm-cxr dataset with accelerate (one process, several, mixed precision).

A run folder holds everything: ``config.json`` (the resolved training and model configs),
``versions.json``, ``metrics.csv``, ``samples/`` (original over reconstruction, PNG),
``checkpoints/last.pt`` (written atomically; a killed run resumes from it) and ``model/``
(the VQ-GAN, loadable with ``VQGAN.from_pretrained(RUN)``).

Codebook health: an exponential moving average of how often each code is chosen is kept;
every ``dead_code_every`` steps, codes used less than ``dead_code_threshold`` times per step
on average are re-initialised from encoder outputs of the current batch (as in Jukebox,
Dhariwal et al. 2020, and Zeghidour et al.'s SoundStream, 2021).
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
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from llm_cxr.configs import from_dict_strict, read_yaml_config, run_versions
from llm_cxr.errors import ConfigError
from llm_cxr.files import save_atomic
from llm_cxr.vqgan.config import VQGANConfig, preset
from llm_cxr.vqgan.data import ImageTensorDataset
from llm_cxr.vqgan.losses import (
    FeatureLoss,
    NLayerDiscriminator,
    adaptive_weight,
    edge_l1,
    hinge_d_loss,
    load_feature_net,
)
from llm_cxr.vqgan.model import VQGAN

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"


@dataclass
class VQGANTrainConfig:
    data: str
    out: str
    model: str = "small"  # preset name, or a JSON (VQGANConfig) / taming YAML file
    split: str = "train"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 4e-4
    lr_min_ratio: float = 0.1  # cosine decay to lr * lr_min_ratio
    warmup_steps: int = 100
    codebook_weight: float = 1.0
    disc_start: int | None = 2000  # the step the adversarial loss starts at; None: never
    disc_weight: float = 0.2
    disc_ndf: int = 32
    disc_layers: int = 2
    feature_net: str | None = None  # a frozen network saved with torch.export (.pt2) or TorchScript
    feature_weight: float = 0.1
    edge_weight: float = 0.0  # weight of an L1 loss on the images' spatial gradients (llm_cxr.vqgan.losses.edge_l1)
    lpips_vgg: str | None = None  # torchvision vgg16 state dict (user-supplied; enables LPIPS)
    lpips_lin: str | None = None  # lpips' weights/v0.1/vgg.pth (user-supplied)
    lpips_weight: float = 1.0
    dead_code_every: int = 50
    dead_code_threshold: float = 0.03  # EMA uses per step below which a code is dead
    # steps a code (at the start, or just restarted) may go unused before it counts as dead; None: its usage starts
    # at 1, which takes ~350 steps to decay below the default threshold (what runs before this option did)
    dead_code_grace: int | None = None
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    log_every: int = 10
    sample_every: int = 250
    save_every: int = 250
    max_minutes: float | None = None  # stop (and save) after this long
    seed: int = 0
    num_workers: int = 0
    resize: str = "silent"  # images of another size: "silent" | "warn" | "error"
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.steps <= 0 or self.batch_size <= 0:
            problems.append(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be > 0")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if (self.dead_code_grace is not None and self.dead_code_grace < 0) or self.dead_code_threshold <= 0:
            problems.append(f"dead_code_grace ({self.dead_code_grace}) must be >= 0 and dead_code_threshold "
                            f"({self.dead_code_threshold}) > 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.resize not in ("silent", "warn", "error"):
            problems.append(f"resize must be silent, warn or error, got {self.resize!r}")
        if (self.lpips_vgg is None) != (self.lpips_lin is None):
            problems.append("LPIPS needs both lpips_vgg and lpips_lin weight files")
        if problems:
            raise ConfigError("invalid VQ-GAN training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "VQGANTrainConfig":
        return from_dict_strict(cls, d, "training", source)


# Training defaults per model preset, tuned to train on a 2-core CPU (tiny, small) or GPUs.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # bf16 autocast: ~4x faster than fp32 on an AVX-512 CPU; code choice stays in fp32
    # tiny: no adversarial phase (this short it cost 2 dB PSNR: benchmarks/results/2026-12-06-demo-recipe.md); a
    # high lr, codes restarted after 60 unused steps and the edge loss: 28.95 -> 32.48 dB
    # (benchmarks/results/2026-12-06-demo-tokenizer-and-questions.md)
    "tiny": {"steps": 1000, "batch_size": 16, "lr": 4e-3, "disc_start": None, "mixed_precision": "bf16",
             "dead_code_every": 20, "dead_code_grace": 60, "edge_weight": 1.0},
    "small": {"steps": 3000, "batch_size": 16, "lr": 4e-4, "disc_start": 2000, "mixed_precision": "bf16"},
    "llm-cxr-256": {"steps": 100_000, "batch_size": 8, "lr": 4.5e-6 * 8, "disc_start": 30_000, "disc_weight": 0.8,
                    "mixed_precision": "bf16", "sample_every": 1000, "save_every": 1000},
}


def load_train_config(spec: str, **overrides: Any) -> VQGANTrainConfig:
    """``spec``: a preset name, or a YAML file with ``model:`` and training keys.

    ``model:`` in the YAML is a preset name, a path to a taming YAML / llm-cxr JSON, or a
    dict of :class:`VQGANConfig` fields (written to the run as JSON).
    """
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        doc = read_yaml_config(path)
        model_doc = doc.get("model")
        if "ddconfig" in str(model_doc or "") or (isinstance(model_doc, dict) and "params" in model_doc):
            doc = {"model": str(path)}  # a taming model YAML given directly
        model = doc.pop("model", "small")
        if isinstance(model, dict):
            VQGANConfig.from_dict(model, source=str(path))  # validate now, with the file's name
            model_file = Path(overrides.get("out", ".")) / "model_config.json"
            model_file.parent.mkdir(parents=True, exist_ok=True)
            model_file.write_text(json.dumps(model, indent=2))
            model = str(model_file)
        base = {**TRAIN_PRESETS.get(str(model), {}), **doc, "model": str(model)}
        source = str(path)
    else:
        preset(spec)  # a clear error for an unknown name
        base, source = {**TRAIN_PRESETS.get(spec, {}), "model": spec}, f"preset {spec}"
    return VQGANTrainConfig.from_dict({**base, **overrides}, source=source)


def resolve_model_config(spec: str) -> VQGANConfig:
    """A preset name, an llm-cxr JSON config, or a taming YAML."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.exists():
        from llm_cxr.vqgan.taming import read_taming_config

        return read_taming_config(path)
    if path.suffix == ".json" and path.exists():
        return VQGANConfig.load(path)
    return preset(spec)


def _drop_rows_after(path: Path, step: int) -> None:
    """Forget metrics logged after ``step``: a kill fell back to that checkpoint, and the steps after it are
    trained (and logged) again."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows):
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _lr_at(step: int, cfg: VQGANTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _batches(ds, cfg: VQGANTrainConfig, start_step: int, accelerator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches; epoch e is shuffled with seed + e, so a resumed run continues
    exactly where it stopped."""
    per_epoch = max(1, len(ds) // (cfg.batch_size * accelerator.num_processes))
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True,
                            sampler=torch.utils.data.RandomSampler(ds, generator=g))
        loader = accelerator.prepare_data_loader(loader)
        if skip:
            from accelerate import skip_first_batches

            loader = skip_first_batches(loader, skip)
            skip = 0
        yield from loader
        epoch += 1


@dataclass
class _State:
    step: int
    usage: torch.Tensor  # (K,) EMA of uses per step


def _save_checkpoint(run: Path, accelerator, model, disc, opt_g, opt_d, state: _State) -> None:
    if not accelerator.is_main_process:
        return
    path = run / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": state.step, "usage": state.usage.cpu(),
               "model": accelerator.unwrap_model(model).state_dict(),
               "disc": accelerator.unwrap_model(disc).state_dict(),
               "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "torch_rng": torch.get_rng_state()}
    save_atomic(path, lambda f: torch.save(payload, f))  # a kill or a full disk leaves the previous one intact
    accelerator.unwrap_model(model).save_pretrained(run / "model")


def _load_checkpoint(run: Path, model, disc, opt_g, opt_d, accelerator) -> _State | None:
    path = run / CHECKPOINT
    if not path.exists():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    accelerator.unwrap_model(model).load_state_dict(ck["model"])
    accelerator.unwrap_model(disc).load_state_dict(ck["disc"])
    opt_g.load_state_dict(ck["opt_g"])
    opt_d.load_state_dict(ck["opt_d"])
    torch.set_rng_state(ck["torch_rng"])
    log.info("resumed %s at step %d", run, ck["step"])
    return _State(ck["step"], ck["usage"].to(accelerator.device))


def _grace_usage(cfg: VQGANTrainConfig) -> float:
    """The usage EMA a new code starts at: it decays (x0.99 a step) below the threshold after ``dead_code_grace``
    unused steps. A short run cannot wait the default's 350 steps: its early codebook collapses onto a few codes
    (perplexity ~6 for the tiny preset's first 350 steps) and nothing restarts the rest until then."""
    if cfg.dead_code_grace is None:
        return 1.0
    return cfg.dead_code_threshold / 0.99 ** cfg.dead_code_grace


def _reinit_dead_codes(model: VQGAN, latent: torch.Tensor, state: _State, cfg: VQGANTrainConfig,
                       accelerator) -> int:
    dead = (state.usage < cfg.dead_code_threshold).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = latent.detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).float()
    pool = accelerator.gather(flat)  # the same pool on every process
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + state.step)
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=g).to(pool.device)
    noise = torch.randn(dead.numel(), pool.shape[1], generator=g).to(pool.device) * 1e-3
    with torch.no_grad():
        emb = model.quantize.embedding.weight
        emb[dead.to(emb.device)] = (pool[pick] + noise).to(emb.dtype)
    state.usage[dead] = _grace_usage(cfg)  # give new codes time to be chosen
    return int(dead.numel())


def _write_sample(run: Path, step: int, x: torch.Tensor, recon: torch.Tensor) -> None:
    from llm_cxr.report_html import contact_sheet_png

    n = min(8, x.shape[0])
    ims = VQGAN.to_pil(torch.cat([x[:n], recon[:n]]).float())
    (run / "samples").mkdir(exist_ok=True)
    contact_sheet_png(ims, cols=n).save(run / "samples" / f"step_{step:06d}.png")


def _init_run(cfg: VQGANTrainConfig, model_cfg: VQGANConfig, accelerator) -> Path:
    run = Path(cfg.out)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        saved = run / "config.json"
        resolved = {"train": asdict(cfg), "model": model_cfg.to_dict()}
        if saved.exists() and (run / CHECKPOINT).exists():
            old = json.loads(saved.read_text())
            if old.get("model") != resolved["model"]:
                raise ConfigError(f"{run} holds a run with another model config; resume with the same "
                                  f"config or choose a new --out")
        saved.write_text(json.dumps(resolved, indent=2) + "\n")
        (run / "versions.json").write_text(json.dumps(run_versions(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return run


def train_vqgan(cfg: VQGANTrainConfig, accelerator=None) -> Path:
    """Train (or resume) a VQ-GAN run; returns the run folder."""
    from tqdm.auto import tqdm

    from llm_cxr.accel import make_accelerator
    from llm_cxr.data.dataset import load_dataset

    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    model_cfg = resolve_model_config(cfg.model)
    run = _init_run(cfg, model_cfg, accelerator)
    ds = ImageTensorDataset(load_dataset(cfg.data, split=cfg.split), model_cfg.resolution, model_cfg.in_channels,
                            resize=cfg.resize, progress=cfg.progress and accelerator.is_main_process)
    model = VQGAN(model_cfg)
    disc = NLayerDiscriminator(model_cfg.out_ch, cfg.disc_ndf, cfg.disc_layers)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    feat = FeatureLoss(load_feature_net(cfg.feature_net)).to(accelerator.device) if cfg.feature_net else None
    lp = None
    if cfg.lpips_vgg:
        from llm_cxr.vqgan.lpips import LPIPS

        lp = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin).to(accelerator.device)
    state = _load_checkpoint(run, model, disc, opt_g, opt_d, accelerator) or _State(
        0, torch.full((model_cfg.n_embed,), _grace_usage(cfg), device=accelerator.device))
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process and state.step < cfg.steps:
        # model/ is rewritten at every checkpoint from here on: a DONE left by a shorter run would vouch for it
        (run / "DONE").unlink(missing_ok=True)
    metrics_path = run / "metrics.csv"
    # Only the main process touches metrics.csv: a second rank opening it in append mode would create it
    # before the main one checks for it, and the header would be lost (seen in CI).
    if accelerator.is_main_process and metrics_path.exists():
        _drop_rows_after(metrics_path, state.step)
    new_file = accelerator.is_main_process and not metrics_path.exists()
    t_start = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="vqgan",
               disable=not (cfg.progress and accelerator.is_main_process))
    batches = _batches(ds, cfg, state.step, accelerator)
    x = None  # stays None when the run had already reached its steps
    with (open(metrics_path, "a", newline="") if accelerator.is_main_process else open(os.devnull, "w")) as mf:
        writer = csv.writer(mf)
        if new_file:
            writer.writerow(["step", "loss", "rec_l1", "qloss", "g_loss", "d_loss", "d_weight", "perplexity",
                             "usage", "reinit", "lr", "seconds"])
        while state.step < cfg.steps:
            x = next(batches)
            row = _train_step(x, model, raw, disc, opt_g, opt_d, feat, lp, state, cfg, accelerator)
            state.step += 1
            bar.update(1)
            # refresh=False: the bar's own interval decides when to redraw (every step would flood a log file)
            bar.set_postfix(l1=f"{row['rec_l1']:.4f}", usage=f"{row['usage']:.0%}", ppl=f"{row['perplexity']:.0f}",
                            refresh=False)
            if accelerator.is_main_process and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
                writer.writerow([state.step] + [f"{row[k]:.6g}" for k in ("loss", "rec_l1", "qloss", "g_loss", "d_loss",
                                "d_weight", "perplexity", "usage", "reinit", "lr")]
                                + [f"{time.monotonic() - t_start:.1f}"])
                mf.flush()
            if accelerator.is_main_process and state.step % cfg.sample_every == 0:
                _write_sample(run, state.step, x, row["recon"])
            out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or out_of_time:
                _save_checkpoint(run, accelerator, model, disc, opt_g, opt_d, state)
            if out_of_time:
                log.warning("stopping at step %d: max_minutes=%s reached (resume with the same command)",
                            state.step, cfg.max_minutes)
                break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and state.step >= cfg.steps:
        if x is not None:
            _write_sample(run, state.step, x, row["recon"])
        (run / "DONE").write_text(json.dumps({"steps": state.step}) + "\n")
    return run


def _train_step(x, model, raw: VQGAN, disc, opt_g, opt_d, feat, lp, state: _State, cfg: VQGANTrainConfig,
                accelerator) -> dict[str, Any]:
    lr = _lr_at(state.step, cfg)
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    model.train()
    out = model(x)
    rec = (x - out.recon.float()).abs().mean()
    nll = rec + (cfg.feature_weight * feat(x, out.recon.float()) if feat is not None else 0.0)
    if cfg.edge_weight:
        nll = nll + cfg.edge_weight * edge_l1(x, out.recon.float())
    if lp is not None:
        from llm_cxr.vqgan.lpips import lpips_loss

        nll = nll + cfg.lpips_weight * lpips_loss(lp, x, out.recon)
    loss = nll + cfg.codebook_weight * out.qloss
    use_gan = cfg.disc_start is not None and state.step >= cfg.disc_start
    g_loss = d_weight = torch.zeros((), device=x.device)
    if use_gan:
        g_loss = -disc(out.recon).float().mean()
        d_weight = adaptive_weight(nll, g_loss, raw.decoder.last_layer) * cfg.disc_weight
        loss = loss + d_weight * g_loss
    opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    opt_g.step()
    d_loss = torch.zeros((), device=x.device)
    if use_gan:
        d_loss = hinge_d_loss(disc(x).float(), disc(out.recon.detach()).float())
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        opt_d.step()
    counts = torch.bincount(out.indices.flatten(), minlength=raw.config.n_embed).float()
    counts = accelerator.reduce(counts, "sum") / accelerator.num_processes
    state.usage.mul_(0.99).add_(0.01 * counts)
    reinit = 0
    if cfg.dead_code_every and (state.step + 1) % cfg.dead_code_every == 0:
        reinit = _reinit_dead_codes(raw, out.latent, state, cfg, accelerator)
    return {"loss": loss.item(), "rec_l1": rec.item(), "qloss": out.qloss.item(), "g_loss": g_loss.item(),
            "d_loss": d_loss.item(), "d_weight": float(d_weight), "perplexity": out.perplexity.item(),
            "usage": float((state.usage >= cfg.dead_code_threshold).float().mean()), "reinit": reinit, "lr": lr,
            "recon": out.recon.detach()}
