"""Drawing findings over a synthetic chest radiograph: pathologies and support devices.

Each drawer takes the :class:`~llm_cxr.data.synth_render.Body` of the study, changes its
density map in place (devices: a separate ``metal`` coverage layer composited last, near
white) and returns the finding's boolean pixel mask. Drawing happens in the bounding box
of the finding where it is small. Appearances follow the textbook radiographic signs
(e.g. Felson, *Principles of Chest Roentgenology*): an effusion is a homogeneous basal
opacity with a meniscus rising laterally that effaces the costophrenic angle; a
pneumothorax is a lucent rim without lung markings outside a visible visceral pleural
line; edema is a perihilar "batwing" haze with Kerley B lines; plate-like atelectasis is a
thin basal band.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from llm_cxr.data.schema import Finding
from llm_cxr.data.synth_render import (
    F32,
    SOFT_TISSUE,
    Body,
    Canvas,
    bezier,
    heart_sdf,
    lung_sdf,
    segment_distance,
    side_sign,
)

# Lobe zones in lung-local coordinates: (u range medial->lateral, v range apex->dome).
LOBE_ZONES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "right upper lobe": ((0.3, 0.75), (0.15, 0.38)),
    "right middle lobe": ((0.2, 0.5), (0.55, 0.75)),
    "right lower lobe": ((0.45, 0.8), (0.62, 0.82)),
    "left upper lobe": ((0.35, 0.75), (0.15, 0.45)),
    "left lower lobe": ((0.5, 0.8), (0.6, 0.8)),
}
EFFUSION_LEVEL = {"small": (0.84, 0.88), "moderate": (0.66, 0.74), "large": (0.42, 0.52)}
PTX_SCALE = {"small": 0.86, "moderate": 0.74, "large": 0.58}
EDEMA_LEVEL = {"mild": (0.26, 0.13), "moderate": (0.33, 0.19), "severe": (0.42, 0.26)}


def _side_mask(cv: Canvas, body: Body, s: int, sl) -> np.ndarray:
    return ((cv.X[sl] - body.anat.cx) * s > 0).astype(F32)


def _hemithorax_box(cv: Canvas, body: Body, s: int, y0: float, y1: float):
    a = body.anat
    return cv.bbox([a.cx, a.cx + s * (a.thorax_hw + 0.06)], [y0, y1], 0.04)


def lung_spot(body: Body, laterality: str, lobe: str, radius: float,
              rng: np.random.Generator) -> tuple[float, float]:
    """A point in the lobe's zone whose disc of this radius lies in aerated lung, off the heart."""
    (u0, u1), (v0, v1) = LOBE_ZONES[lobe]
    best, best_score = None, -np.inf
    for _ in range(24):
        x, y = body.lung_point(laterality, rng.uniform(u0, u1), rng.uniform(v0, v1))
        d_lung = -float(lung_sdf(np.float64(x), np.float64(y), body.anat, body.dome_y))
        d_heart = float(heart_sdf(x, y, body.heart_ellipse, body.anat.heart_tilt))
        score = min(d_lung - radius, d_heart - 0.5 * radius)
        if score >= 0:
            return x, y
        if score > best_score:
            best, best_score = (x, y), score
    return best


def draw_cardiomegaly(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """The heart was already drawn enlarged (ctr from the finding); its mask is the heart."""
    return body.heart > 0.5


def draw_effusion(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    a = body.anat
    mask = np.zeros((cv.size, cv.size), dtype=bool)
    lo, hi = EFFUSION_LEVEL[f.severity or "moderate"]
    sides = ("right", "left") if f.laterality == "bilateral" else (f.laterality,)
    for lat in sides:
        s = side_sign(lat)
        dome = body.dome_y[0 if lat == "right" else 1]
        level, rise = rng.uniform(lo, hi), rng.uniform(0.14, 0.22)
        top = a.apex_y + (level - rise) * (dome - a.apex_y)
        sl = _hemithorax_box(cv, body, s, top - 0.05, dome + 0.3)
        X, Y = cv.X[sl], cv.Y[sl]
        u = np.clip((np.abs(X - a.cx) - a.med_hw) / (a.thorax_hw - a.med_hw), 0.0, 1.0)
        y_fluid = a.apex_y + (level - rise * u * u) * (dome - a.apex_y)  # meniscus, rising laterally
        depth = np.clip((Y - y_fluid) / 0.06, 0.4, 1.0)
        fluid = cv.edge(body.lung_sdf[sl], 1.5) * cv.edge(y_fluid - Y, 2.5) * _side_mask(cv, body, s, sl)
        body.density[sl] += fluid * depth * (F32(SOFT_TISSUE + 0.02) - body.density[sl])
        mask[sl] |= fluid > 0.5
    return mask


def draw_pneumothorax(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """The lung collapses towards its lower hilum; the rim it leaves is black and featureless."""
    a, s = body.anat, side_sign(f.laterality)
    k = PTX_SCALE[f.severity or "moderate"] * rng.uniform(0.97, 1.03)
    px0, py0 = body.lung_point(f.laterality, 0.1, 0.72)
    sl = _hemithorax_box(cv, body, s, a.apex_y - 0.05, max(body.dome_y) + 0.3)
    X, Y = cv.X[sl], cv.Y[sl]
    collapsed = lung_sdf(px0 + (X - px0) / k, py0 + (Y - py0) / k, a, body.dome_y) * k
    side = _side_mask(cv, body, s, sl)
    space = cv.edge(body.lung_sdf[sl], 1.2) * side * (1.0 - body.heart[sl])
    ptx = space * (1.0 - cv.edge(collapsed, 1.0))
    line = cv.edge(np.abs(collapsed) - 0.35 * cv.px, 0.8) * space
    dens = body.density[sl]
    dens -= ptx * (body.markings[sl] + F32(0.07))
    dens += F32(0.04) * cv.edge(collapsed, 1.0) * space + F32(0.16) * line
    mask = np.zeros((cv.size, cv.size), dtype=bool)
    mask[sl] = ptx > 0.5
    return mask


def draw_consolidation(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    a = body.anat
    confluent = f.extra.get("pattern") == "confluent"
    cx, cy = lung_spot(body, f.laterality, f.location, 0.1, rng)
    sl = cv.bbox([cx], [cy], 0.4)
    X, Y = cv.X[sl], cv.Y[sl]
    blob = np.zeros(X.shape, dtype=F32)
    for _ in range(int(rng.integers(4, 8))):
        bx, by = cx + rng.normal(0, 0.09), cy + rng.normal(0, 0.07)
        sig = rng.uniform(0.08, 0.13) if confluent else rng.uniform(0.05, 0.08)
        blob += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / F32(2 * sig * sig))
    patch = F32(0.4) if confluent else F32(0.9)
    blob = blob * np.maximum(F32(1.0) + patch * cv.noise(rng, sl), F32(0.6))
    opacity = (F32(1.0) - np.exp(-np.maximum(blob - F32(0.3), F32(0.0)) * F32(1.6))) * body.lungs[sl]
    dens = body.density[sl]
    dens += opacity * (F32(0.28) if confluent else F32(0.22))
    if f.extra.get("air_bronchograms"):
        hx, hy = a.cx + side_sign(f.laterality) * (a.med_hw + 0.02), a.carina_y + 0.15
        for _ in range(2):
            ex, ey = cx + rng.normal(0, 0.05) + (cx - hx) * 0.3, cy + rng.normal(0, 0.05) + (cy - hy) * 0.3
            d = segment_distance(X, Y, np.array([[hx, hy], [ex, ey]]))
            dens -= F32(0.14) * cv.edge(d - 0.6 * cv.px, 0.8) * np.clip(opacity * 2 - 1, 0.0, 1.0)
    mask = np.zeros((cv.size, cv.size), dtype=bool)
    mask[sl] = opacity > 0.3
    return mask


def _draw_round(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator, lobulated: bool,
                strength: float) -> np.ndarray:
    r = max(0.5 * f.size_mm / body.anat.mm_per_unit, 2.0 * cv.px)  # at least 4 px across
    cx, cy = lung_spot(body, f.laterality, f.location, r, rng)
    sl = cv.bbox([cx], [cy], r * 1.3)
    dx, dy = cv.X[sl] - cx, cv.Y[sl] - cy
    rr = np.sqrt(dx * dx + dy * dy)
    if lobulated:
        th = np.arctan2(dy, dx)
        rr = rr / (1.0 + 0.09 * np.cos(3 * th + rng.uniform(0, 6.3)) + 0.05 * np.cos(5 * th + rng.uniform(0, 6.3)))
    cover = cv.edge(rr - r, 1.2)
    body.density[sl] += F32(strength) * cover * (F32(0.75) + F32(0.25) * np.sqrt(np.clip(1 - rr / r, 0, 1)))
    mask = np.zeros((cv.size, cv.size), dtype=bool)
    mask[sl] = cover > 0.5
    return mask


def draw_nodule(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    return _draw_round(cv, body, f, rng, lobulated=False, strength=0.24)


def draw_mass(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    return _draw_round(cv, body, f, rng, lobulated=True, strength=0.28)


def draw_edema(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar haze, wider than tall, with Kerley B lines when not mild."""
    a = body.anat
    sigma, amp = EDEMA_LEVEL[f.severity or "moderate"]
    dx = (np.abs(cv.X - a.cx) - a.med_hw) / F32(sigma * 1.3)
    dy = (cv.Y - a.carina_y - 0.22) / F32(sigma)
    haze = np.exp(-(dx * dx + dy * dy)) * (F32(0.85) + F32(0.2) * cv.noise(rng)) * body.lungs
    body.density += F32(amp) * haze
    if f.severity != "mild":
        _kerley_lines(cv, body, rng)
    return haze > 0.3


def _kerley_lines(cv: Canvas, body: Body, rng: np.random.Generator) -> None:
    a = body.anat
    for lat in ("right", "left"):
        s = side_sign(lat)
        x0, y0 = body.lung_point(lat, 0.92, 0.78)
        sl = cv.bbox([x0 - 0.08, x0 + 0.08], [y0 - 0.02, y0 + 0.15], 0.02)
        X, Y = cv.X[sl], cv.Y[sl]
        lines = np.zeros(X.shape, dtype=F32)
        for j in range(int(rng.integers(3, 6))):
            yj = y0 + 0.03 * j + rng.uniform(-0.008, 0.008)
            pts = np.array([[a.cx + s * a.thorax_hw, yj], [a.cx + s * (a.thorax_hw - 0.07), yj]])
            lines = np.maximum(lines, cv.edge(segment_distance(X, Y, pts) - 0.4 * cv.px, 0.8))
        body.density[sl] += F32(0.1) * lines * body.lungs[sl]


def draw_atelectasis(cv: Canvas, body: Body, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Plate-like (discoid) atelectasis: a thin, slightly oblique band at the lung base."""
    s = side_sign(f.laterality)
    cx, cy = body.lung_point(f.laterality, rng.uniform(0.4, 0.62), rng.uniform(0.7, 0.8))
    half, thick = rng.uniform(0.14, 0.22), max(rng.uniform(0.02, 0.03), 1.3 * cv.px)
    ang = s * rng.uniform(-0.1, 0.3)  # the lateral end a little higher
    ex, ey = half * math.cos(ang), -half * math.sin(ang) * s
    pts = np.array([[cx - ex, cy - ey], [cx + ex, cy + ey]])
    sl = cv.bbox(pts[:, 0], pts[:, 1], thick + 0.02)
    band = cv.edge(segment_distance(cv.X[sl], cv.Y[sl], pts) - thick, 2.0) * body.lungs[sl]
    body.density[sl] += F32(0.15) * band
    mask = np.zeros((cv.size, cv.size), dtype=bool)
    mask[sl] = band > 0.5
    return mask


# ---- devices ---------------------------------------------------------------------------------

def _stroke(cv: Canvas, metal: np.ndarray, pts: np.ndarray, half_w: float, tube: bool) -> np.ndarray:
    """Draw a polyline into the metal layer; a tube has bright walls and a radiopaque stripe."""
    half_w = max(half_w, 0.6 * cv.px)
    sl = cv.bbox(pts[:, 0], pts[:, 1], half_w + 2 * cv.px)
    d = segment_distance(cv.X[sl], cv.Y[sl], pts)
    if tube:
        cover = F32(0.55) * cv.edge(d - half_w, 1.0) + F32(0.4) * cv.edge(d - 0.35 * half_w, 1.0)
    else:
        cover = F32(0.9) * cv.edge(d - half_w, 1.0)
    metal[sl] = np.maximum(metal[sl], cover)
    mask = np.zeros(metal.shape, dtype=bool)
    mask[sl] = d < half_w + 1.5 * cv.px
    return mask


def _svc_tip(body: Body, rng: np.random.Generator) -> tuple[float, float]:
    a = body.anat
    return a.cx - 0.85 * a.med_hw, a.carina_y + rng.uniform(0.0, 0.1)


def draw_endotracheal_tube(cv, body: Body, f: Finding, metal, rng) -> np.ndarray:
    a = body.anat
    tip_y = a.carina_y - 10.0 * f.extra["tip_above_carina_cm"] / a.mm_per_unit
    pts = bezier([(a.cx + rng.uniform(-0.05, 0.05), -1.05), (a.cx, -0.85), (a.cx, tip_y)], 12)
    return _stroke(cv, metal, pts, 0.024, tube=True)


def draw_central_line(cv, body: Body, f: Finding, metal, rng) -> np.ndarray:
    a, s = body.anat, side_sign(f.laterality)
    tip = _svc_tip(body, rng)
    if f.extra.get("vein") == "subclavian":
        ctrl = [(a.cx + s * 0.62, a.apex_y + 0.02), (a.cx + s * 0.3, a.apex_y + 0.2),
                (a.cx + s * 0.05, a.apex_y + 0.2)]
    else:  # internal jugular: down the neck beside the trachea
        ctrl = [(a.cx + s * 0.14, -1.05), (a.cx + s * 0.13, a.apex_y - 0.05),
                (a.cx + s * 0.06, a.apex_y + 0.2)]
    pts = bezier(ctrl + [(tip[0], tip[1] - 0.15), tip], 24)
    return _stroke(cv, metal, pts, 0.009, tube=False)


def draw_chest_tube(cv, body: Body, f: Finding, metal, rng) -> np.ndarray:
    a, s = body.anat, side_sign(f.laterality)
    dome = body.dome_y[0 if f.laterality == "right" else 1]
    pts = bezier([(a.cx + s * (a.body_hw + 0.01), dome - 0.02),
                  (a.cx + s * (a.thorax_hw - 0.02), dome - 0.12),
                  (a.cx + s * (a.thorax_hw - 0.04), a.apex_y + 0.3),
                  (a.cx + s * rng.uniform(0.3, 0.45), a.apex_y + rng.uniform(0.12, 0.22))], 20)
    return _stroke(cv, metal, pts, 0.02, tube=True)


def draw_pacemaker(cv, body: Body, f: Finding, metal, rng) -> np.ndarray:
    a, s = body.anat, side_sign(f.laterality)
    gx, gy = a.cx + s * rng.uniform(0.4, 0.48), a.apex_y + rng.uniform(0.18, 0.26)
    sl = cv.bbox([gx], [gy], 0.11)
    dx, dy = cv.X[sl] - gx, cv.Y[sl] - gy
    box = (np.abs(dx / 0.075) ** 4 + np.abs(dy / 0.055) ** 4) ** 0.25 - 1.0
    cover = cv.edge(box * 0.055, 1.0)
    metal[sl] = np.maximum(metal[sl], cover)
    mask = np.zeros(metal.shape, dtype=bool)
    mask[sl] = box * 0.055 < 1.5 * cv.px
    hx, hy, hw, hh = body.heart_geom
    svc = _svc_tip(body, rng)
    for tip in ((hx - 0.55 * hw, hy - 0.35 * hh), (hx + 0.15 * hw, hy + 0.45 * hh)):  # RA, RV
        pts = bezier([(gx - s * 0.05, gy), (a.cx + s * 0.12, a.apex_y + 0.12), (svc[0], svc[1] - 0.1),
                      svc, tip], 24)
        mask |= _stroke(cv, metal, pts, 0.008, tube=False)
    return mask


PATHOLOGY_DRAWERS: dict[str, Callable[..., np.ndarray]] = {
    "cardiomegaly": draw_cardiomegaly,
    "edema": draw_edema,
    "consolidation": draw_consolidation,
    "atelectasis": draw_atelectasis,
    "nodule": draw_nodule,
    "mass": draw_mass,
    "pneumothorax": draw_pneumothorax,
    "pleural_effusion": draw_effusion,
}
DEVICE_DRAWERS: dict[str, Callable[..., np.ndarray]] = {
    "endotracheal_tube": draw_endotracheal_tube,
    "central_line": draw_central_line,
    "chest_tube": draw_chest_tube,
    "pacemaker": draw_pacemaker,
}
