"""Synthetic chest X-rays with ground truth: the project's embedded default dataset.

Each study is a frontal radiograph caricature (drawn by :mod:`llm_cxr.data.synth_render`
and :mod:`llm_cxr.data.synth_findings`) with structured findings (laterality, location,
severity, size), one boolean pixel mask per finding, and a radiology-style report
(:mod:`llm_cxr.data.synth_report`). Studies of one patient share the patient's anatomy;
splits are by patient. Everything is a pure function of ``(seed, index)``, so a dataset is
byte-identical however many worker processes made it.

``--correlate FINDING:DEVICE:RATE`` plants a shortcut for bias studies (the
chest-drain-in-pneumothorax confounder; Oakden-Rayner et al., "Hidden stratification",
CHIL 2020): see :class:`Correlation` for the exact semantics.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llm_cxr.data.dataset import WriteJob, WriteSummary, write_dataset
from llm_cxr.data.reports import format_report
from llm_cxr.data.schema import (
    DEVICES,
    PATHOLOGIES,
    Finding,
    assign_split,
    findings_to_json,
    labels_from_findings,
)
from llm_cxr.data.synth_findings import DEVICE_DRAWERS, LOBE_ZONES, PATHOLOGY_DRAWERS
from llm_cxr.data.synth_render import (
    Canvas,
    PatientAnatomy,
    StudyView,
    finalize,
    render_anatomy,
    sample_anatomy,
)
from llm_cxr.data.synth_report import write_report
from llm_cxr.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Correlation", "SynthConfig", "SynthStudy", "PatientAnatomy", "generate_dataset",
           "generate_study", "parse_correlate", "patient_plan", "sample_anatomy", "sample_findings"]

# Relative weights of the pathologies among abnormal studies.
DEFAULT_PATHOLOGY_WEIGHTS: dict[str, float] = {
    "cardiomegaly": 1.0, "pleural_effusion": 1.2, "pneumothorax": 0.7, "consolidation": 1.0,
    "nodule": 0.8, "mass": 0.4, "edema": 0.7, "atelectasis": 0.9,
}
# Base rate of each device (independent of the findings unless a Correlation says otherwise).
DEFAULT_DEVICE_RATES: dict[str, float] = {
    "endotracheal_tube": 0.06, "central_line": 0.08, "chest_tube": 0.05, "pacemaker": 0.04,
}


@dataclass(frozen=True)
class Correlation:
    """A planted finding -> device association.

    Semantics: every device is first drawn at its base rate (``SynthConfig.device_rates``).
    If ``finding`` is present in a study, that draw is replaced: ``device`` is present with
    probability ``rate`` (several correlations for the same device whose findings are all
    present: the device is present if any of their draws succeeds). If ``finding`` is
    absent, ``device`` keeps its base rate. So ``P(device | finding) = rate`` and
    ``P(device | no finding) = base rate``; ``rate=0`` plants an anti-correlation.
    """

    finding: str
    device: str
    rate: float

    def __post_init__(self) -> None:
        if self.finding not in PATHOLOGIES:
            raise ConfigError(f"correlation finding {self.finding!r} is not a pathology; use one of "
                              f"{', '.join(PATHOLOGIES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"correlation device {self.device!r} is not a device; use one of "
                              f"{', '.join(DEVICES)}")
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ConfigError(f"correlation rate {self.rate!r} for {self.finding}:{self.device} must be in [0, 1]")

    def __str__(self) -> str:
        return f"{self.finding}:{self.device}:{self.rate:g}"


def parse_correlate(spec: str) -> Correlation:
    """Parse ``FINDING:DEVICE:RATE`` (e.g. ``pneumothorax:chest_tube:0.95``)."""
    parts = spec.strip().split(":")
    if len(parts) != 3:
        raise ConfigError(f"--correlate {spec!r}: expected FINDING:DEVICE:RATE, e.g. pneumothorax:chest_tube:0.95")
    try:
        rate = float(parts[2])
    except ValueError:
        raise ConfigError(f"--correlate {spec!r}: rate {parts[2]!r} is not a number; give one in [0, 1]") from None
    return Correlation(parts[0].strip(), parts[1].strip(), rate)


@dataclass
class SynthConfig:
    """What the generator draws.

    Each study is normal (no pathology; devices may still be present) with probability
    ``normal_fraction``; otherwise it has 1, 2 or 3 distinct pathologies with probabilities
    ``n_pathologies_probs``, picked in proportion to ``pathology_weights``. The prevalence
    of a pathology is thus about ``(1 - normal_fraction) * E[k] * w / sum(w)`` (6-17% with
    the defaults; measured in ``benchmarks/results/synth.md``). Devices appear at
    ``device_rates`` (about 20% of studies have one), modified by ``correlations``. Names
    left out of ``pathology_weights`` / ``device_rates`` get 0: ``{"nodule": 1.0}`` means
    nodules only.
    """

    size: int = 128
    normal_fraction: float = 0.38
    n_pathologies_probs: tuple[float, float, float] = (0.55, 0.3, 0.15)
    pathology_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PATHOLOGY_WEIGHTS))
    device_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEVICE_RATES))
    correlations: list[Correlation] = field(default_factory=list)
    images_per_patient: float = 1.5
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or not 64 <= self.size <= 512:
            raise ConfigError(f"synthetic image size must be an integer from 64 to 512 px, got {self.size!r}")
        self.size = int(self.size)
        _check_fraction("normal_fraction", self.normal_fraction)
        self.n_pathologies_probs = _check_probs("n_pathologies_probs", self.n_pathologies_probs, 3)
        self.split_fractions = _check_probs("split_fractions", self.split_fractions, 3)
        self.pathology_weights = _check_names("pathology_weights", self.pathology_weights, PATHOLOGIES, None)
        if sum(self.pathology_weights.values()) <= 0 and self.normal_fraction < 1:
            raise ConfigError("pathology_weights are all 0 but normal_fraction < 1; give some pathology a weight")
        self.device_rates = _check_names("device_rates", self.device_rates, DEVICES, 1.0)
        self.correlations = [c if isinstance(c, Correlation) else
                             Correlation(**c) if isinstance(c, dict) else Correlation(*c) for c in self.correlations]
        if not float(self.images_per_patient) >= 1.0:
            raise ConfigError(f"images_per_patient (--images-per-patient) must be >= 1, "
                              f"got {self.images_per_patient!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["correlations"] = [str(c) for c in self.correlations]
        return d


def _check_fraction(name: str, v: float) -> None:
    if not 0.0 <= float(v) <= 1.0:
        raise ConfigError(f"SynthConfig.{name} must be in [0, 1], got {v!r}")


def _check_probs(name: str, v, n: int) -> tuple[float, ...]:
    v = tuple(float(x) for x in v)
    if len(v) != n or min(v) < 0 or abs(sum(v) - 1.0) > 1e-6:
        raise ConfigError(f"SynthConfig.{name} must be {n} non-negative numbers summing to 1, got {v}")
    return v


def _check_names(name: str, d: dict[str, float], known: tuple[str, ...], top: float | None) -> dict[str, float]:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"SynthConfig.{name} has unknown names {unknown}; known: {', '.join(known)}")
    out = {k: float(d.get(k, 0.0)) for k in known}
    bad = {k: v for k, v in out.items() if v < 0 or (top is not None and v > top)}
    if bad:
        raise ConfigError(f"SynthConfig.{name} values must be >= 0{' and <= 1' if top else ''}, got {bad}")
    return out


@dataclass
class SynthStudy:
    """One synthetic study: the image, its ground truth and its report."""

    image: np.ndarray  # (S, S) uint8
    findings: list[Finding]
    masks: dict[str, np.ndarray]  # finding name -> (S, S) bool
    report: str
    findings_text: str
    impression_text: str
    anatomy: dict[str, np.ndarray]  # "heart", "lungs", "body" -> (S, S) bool
    mm_per_px: float


# ---- sampling the findings --------------------------------------------------------------------

def _choice(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _lobe(rng: np.random.Generator, avoid_lower: set[str], upper_bias: bool = False) -> str:
    lobes = [lb for lb in LOBE_ZONES if not (lb.split()[0] in avoid_lower and "upper" not in lb)]
    w = np.array([2.0 if upper_bias and "upper" in lb else 1.0 for lb in lobes])
    return _choice(rng, lobes, w / w.sum())


def _pathology(name: str, rng: np.random.Generator, avoid_lower: set[str]) -> Finding:
    """Draw one pathology's attributes. avoid_lower: sides whose bases a big effusion hides."""
    if name == "cardiomegaly":
        ctr = float(rng.uniform(0.53, 0.68))
        sev = "mild" if ctr < 0.57 else "moderate" if ctr < 0.62 else "severe"
        return Finding(name, severity=sev, extra={"ctr": round(ctr, 3)})
    if name == "pleural_effusion":
        lat = _choice(rng, ("right", "left", "bilateral"), (0.4, 0.3, 0.3))
        return Finding(name, lat, "basal", _choice(rng, ("small", "moderate", "large"), (0.45, 0.35, 0.2)))
    if name == "pneumothorax":
        return Finding(name, _choice(rng, ("right", "left")), "apical",
                       _choice(rng, ("small", "moderate", "large"), (0.4, 0.35, 0.25)))
    if name == "edema":
        return Finding(name, "bilateral", "perihilar", _choice(rng, ("mild", "moderate", "severe")))
    if name == "atelectasis":
        sides = [s for s in ("right", "left") if s not in avoid_lower] or ["right", "left"]
        lat = _choice(rng, sides)
        return Finding(name, lat, f"{lat} lower lobe")
    lobe = _lobe(rng, avoid_lower, upper_bias=name == "mass")
    lat = lobe.split()[0]
    if name == "consolidation":
        pattern = _choice(rng, ("patchy", "confluent"))
        bronch = bool(rng.random() < (0.5 if pattern == "confluent" else 0.15))
        return Finding(name, lat, lobe, extra={"pattern": pattern, "air_bronchograms": bronch})
    size = float(round(rng.uniform(12, 29) if name == "nodule" else rng.uniform(30, 65)))  # >= ~3.5 px at 128
    return Finding(name, lat, lobe, size_mm=size)


def _device(name: str, rng: np.random.Generator, pathologies: list[Finding]) -> Finding:
    if name == "endotracheal_tube":
        return Finding(name, location="trachea", extra={"tip_above_carina_cm": float(rng.integers(3, 7))})
    if name == "central_line":
        vein = _choice(rng, ("internal jugular", "subclavian"), (0.6, 0.4))
        return Finding(name, _choice(rng, ("right", "left"), (0.7, 0.3)), "superior vena cava",
                       extra={"vein": vein})
    if name == "chest_tube":  # on the side of a pneumothorax or effusion when there is one
        sides = [f.laterality for f in pathologies if f.name in ("pneumothorax", "pleural_effusion")]
        sides = [s for s in sides if s != "bilateral"] or [_choice(rng, ("right", "left"))]
        return Finding(name, sides[0], "pleural space")
    return Finding(name, _choice(rng, ("left", "right"), (0.85, 0.15)), "chest wall")


def sample_findings(rng: np.random.Generator, cfg: SynthConfig) -> list[Finding]:
    """Pathologies and devices of one study, in schema order (see SynthConfig, Correlation)."""
    names: list[str] = []
    if rng.random() >= cfg.normal_fraction:
        w = np.array([cfg.pathology_weights[n] for n in PATHOLOGIES])
        k = min(1 + int(rng.choice(3, p=cfg.n_pathologies_probs)), int((w > 0).sum()))
        names = [PATHOLOGIES[i] for i in rng.choice(len(PATHOLOGIES), size=k, replace=False, p=w / w.sum())]
    pathologies: list[Finding] = []
    avoid_lower: set[str] = set()
    for name in sorted(names, key=lambda n: n != "pleural_effusion"):  # the effusion first
        f = _pathology(name, rng, avoid_lower)
        if name == "pleural_effusion" and f.severity != "small":
            avoid_lower = {"right", "left"} if f.laterality == "bilateral" else {f.laterality}
        pathologies.append(f)
    present = {f.name for f in pathologies}
    devices = []
    for name in DEVICES:
        on = rng.random() < cfg.device_rates[name]
        applicable = [c for c in cfg.correlations if c.device == name and c.finding in present]
        if applicable:
            on = any(rng.random() < c.rate for c in applicable)
        if on:
            devices.append(_device(name, rng, pathologies))
    return sorted(pathologies, key=lambda f: PATHOLOGIES.index(f.name)) + devices


# ---- one study --------------------------------------------------------------------------------

def generate_study(rng: np.random.Generator, cfg: SynthConfig, patient: PatientAnatomy | None = None) -> SynthStudy:
    """Draw one study: findings, image, masks and report, all from ``rng``.

    ``patient`` fixes the anatomy (several studies of one patient); by default a new
    patient is sampled from ``rng``.
    """
    anat = patient if patient is not None else sample_anatomy(rng)
    findings = sample_findings(rng, cfg)
    view = StudyView.sample(rng)
    ctr = next((f.extra["ctr"] for f in findings if f.name == "cardiomegaly"), anat.heart_ctr)
    cv = Canvas(cfg.size, view.rotation)
    body = render_anatomy(cv, anat, view, ctr, rng)
    masks: dict[str, np.ndarray] = {}
    by_name = {f.name: f for f in findings}
    for name, draw in PATHOLOGY_DRAWERS.items():  # drawing order: diffuse first, fluid last
        if name in by_name:
            masks[name] = draw(cv, body, by_name[name], rng)
    metal = np.zeros((cfg.size, cfg.size), dtype=np.float32)
    for name, draw in DEVICE_DRAWERS.items():
        if name in by_name:
            masks[name] = draw(cv, body, by_name[name], metal, rng)
    image = finalize(cv, body.density, metal, view, rng)
    findings_text, impression_text = write_report(findings, rng)
    anatomy = {"heart": body.heart > 0.5, "lungs": body.lungs > 0.5, "body": body.body > 0.5}
    return SynthStudy(image, findings, {n: masks[n] for n in by_name}, format_report(findings_text, impression_text),
                      findings_text, impression_text, anatomy, anat.mm_per_unit * cv.px)


# ---- a dataset ----------------------------------------------------------------------------------

def patient_plan(n: int, seed: int, images_per_patient: float) -> list[int]:
    """Patient index of each of n studies: runs of 1 + Poisson(images_per_patient - 1)."""
    rng = np.random.default_rng([seed, 2])
    plan: list[int] = []
    p = 0
    while len(plan) < n:
        plan += [p] * (1 + int(rng.poisson(images_per_patient - 1.0)))
        p += 1
    return plan[:n]


def _png(a: np.ndarray) -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _make_row(task: tuple[int, int], cfg: SynthConfig, seed: int) -> dict[str, Any] | tuple[str, str]:
    """Row i of the dataset (patient p), or ("error", message); runs in worker processes."""
    i, p = task
    try:
        anat = sample_anatomy(np.random.default_rng([seed, 1, p]))
        study = generate_study(np.random.default_rng([seed, 0, i]), cfg, anat)
        pid = f"synth-{seed}-p{p:06d}"
        meta = {"size": cfg.size, "seed": seed, "index": i, "view": "PA",
                "mm_per_px": round(study.mm_per_px, 4), "correlations": [str(c) for c in cfg.correlations]}
        return {
            "id": f"synth-{seed}-{i:06d}",
            "patient_id": pid,
            "split": assign_split(pid, seed, cfg.split_fractions),
            "image": _png(study.image),
            "report": study.report,
            "findings": findings_to_json(study.findings),
            "labels": labels_from_findings(study.findings),
            "masks": [{"finding": k, "mask": _png(m.astype(np.uint8) * 255)} for k, m in study.masks.items()],
            "source": "synthetic",
            "meta": json.dumps(meta, sort_keys=True),
        }
    except Exception as e:  # a generator bug must not lose the other studies
        return ("error", f"synth-{seed}-{i:06d}: generation failed ({type(e).__name__}: {e})")


def generate_dataset(n: int, out: str | Path, cfg: SynthConfig | None = None, seed: int = 0,
                     workers: int = 1, progress: bool = True) -> WriteSummary:
    """Generate n studies and write them as an llm-cxr dataset at ``out``.

    Deterministic for ``(n, seed, cfg)`` whatever ``workers`` is: study i uses
    ``default_rng([seed, 0, i])``, patient p's anatomy ``default_rng([seed, 1, p])``.
    """
    from tqdm.auto import tqdm

    cfg = cfg or SynthConfig()
    if int(n) < 1:
        raise ConfigError(f"number of synthetic images must be >= 1, got {n}")
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    plan = patient_plan(n, seed, cfg.images_per_patient)
    make = functools.partial(_make_row, cfg=cfg, seed=seed)
    info = {"generator": "llm_cxr.data.synth", "seed": seed, "n_patients": len(set(plan)), "config": cfg.to_dict()}

    def rows(job: WriteJob) -> Iterator[dict[str, Any]]:
        tasks = list(enumerate(plan))[job.start:]  # a resumed job starts after what it wrote
        bar = tqdm(total=n, initial=job.start, desc="synth", unit="img", disable=not progress)
        pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = (pool.imap(make, tasks, chunksize=max(1, min(32, n // (4 * workers)))) if pool
                       else map(make, tasks))
            for (i, _), res in zip(tasks, results):
                bar.update(1)
                job.position = i + 1
                if isinstance(res, tuple):
                    job.add(res[1].split(":")[0], res[1])
                    continue
                yield res
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()

    log.info("generating %d synthetic studies (%d px, seed %d, %d worker(s))", n, cfg.size, seed, workers)
    return write_dataset(rows, out, info=info, key={"n": n})
