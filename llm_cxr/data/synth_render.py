"""Drawing synthetic frontal chest radiographs: anatomy, pathologies and support devices.

Everything is drawn at the final size with vectorised numpy on a cached coordinate grid.
Coordinates are normalised: ``x`` and ``y`` run from -1 to 1 across the image (``y``
downwards), one unit is ``size / 2`` pixels. A frontal film is viewed as if facing the
patient, so the patient's right is the image's left: :func:`side_sign` maps ``"right"`` to
-1 and ``"left"`` to +1.

Shapes are signed distance fields (negative inside, in normalised units), turned into
anti-aliased coverage by :meth:`Canvas.edge`. The image is composed in a "density" map
(higher = more attenuating = brighter on the film): air 0, soft tissue ~0.55, aerated lung
~0.2, bone adds ~0.15-0.25, metal devices are composited last, near white. Small
structures are drawn in their bounding box only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32
SOFT_TISSUE = 0.55


def side_sign(laterality: str) -> int:
    """-1 for the patient's right (image left), +1 for the patient's left (image right)."""
    return -1 if laterality == "right" else 1


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=F32) + 0.5) * (2.0 / size) - 1.0
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int, n: int = 4) -> np.ndarray:
    """Smooth unit-variance noise fields (n, 2*size, 2*size); fixed seed, built once per size."""
    rng = np.random.default_rng(12345)
    m = 2 * size
    f = np.fft.fftfreq(m)[:, None] ** 2 + np.fft.fftfreq(m)[None, :] ** 2
    out = []
    for _ in range(n):
        spec = np.fft.fft2(rng.standard_normal((m, m))) * np.exp(-f * (m / 10.0) ** 2)
        field = np.fft.ifft2(spec).real
        out.append((field - field.mean()) / field.std())
    return np.stack(out).astype(F32)


@dataclass
class PatientAnatomy:
    """What stays the same across a patient's studies (normalised units, see module doc)."""

    cx: float  # body midline
    thorax_hw: float  # inner rib cage half-width (lateral lung edges)
    body_hw: float  # skin outline half-width
    med_hw: float  # upper mediastinum half-width (medial lung edges)
    apex_y: float  # lung apices
    dome_y: float  # top of the right hemidiaphragm dome; the left one is lower
    dome_drop: float  # how much lower the left dome is
    carina_y: float
    heart_ctr: float  # cardiothoracic ratio when the heart is normal
    heart_tilt: float  # radians; long axis points to the apex (image right, down)
    lung_p: float  # superellipse exponent of the lung fields
    rib_c1: float  # posterior rib curvature terms
    rib_c2: float
    rib_spacing: float
    thorax_mm: float  # real inner thoracic width, sets the mm-per-pixel scale

    @property
    def mm_per_unit(self) -> float:
        return self.thorax_mm / (2.0 * self.thorax_hw)


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    thorax_hw = rng.uniform(0.6, 0.72)
    apex_y = rng.uniform(-0.76, -0.66)
    return PatientAnatomy(
        cx=rng.uniform(-0.03, 0.03),
        thorax_hw=thorax_hw,
        body_hw=thorax_hw + rng.uniform(0.1, 0.24),
        med_hw=rng.uniform(0.09, 0.12),
        apex_y=apex_y,
        dome_y=rng.uniform(0.38, 0.52),
        dome_drop=rng.uniform(0.03, 0.07),
        carina_y=apex_y + rng.uniform(0.36, 0.42),
        heart_ctr=rng.uniform(0.4, 0.47),
        heart_tilt=math.radians(rng.uniform(22, 36)),
        lung_p=rng.uniform(2.4, 3.2),
        rib_c1=rng.uniform(0.4, 0.6),
        rib_c2=rng.uniform(0.8, 1.1),
        rib_spacing=rng.uniform(0.115, 0.135),
        thorax_mm=rng.uniform(270, 330),
    )


@dataclass
class StudyView:
    """Per-study acquisition: rotation, exposure, noise, blur, depth of inspiration."""

    rotation: float  # radians
    gain: float
    offset: float
    gamma: float
    noise: float  # per-pixel quantum-noise std at 512 px (smaller renderings average it down)
    blur: bool
    inspiration: float  # shifts the domes (normalised units, + = deeper breath)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "StudyView":
        return cls(
            rotation=math.radians(rng.uniform(-3.0, 3.0)),
            gain=rng.uniform(1.1, 1.3),
            offset=rng.uniform(0.0, 0.05),
            gamma=rng.uniform(0.8, 1.15),
            noise=rng.uniform(0.008, 0.03),
            blur=bool(rng.random() < 0.6),
            inspiration=rng.uniform(-0.04, 0.04),
        )


class Canvas:
    """A size x size frame with rotated coordinates and drawing helpers."""

    def __init__(self, size: int, rotation: float = 0.0) -> None:
        self.size = size
        self.px = 2.0 / size  # one pixel in normalised units
        gx, gy = _grid(size)
        c, s = math.cos(rotation), math.sin(rotation)
        self._rot = (c, s)
        self.X = (c * gx + s * gy).astype(F32)
        self.Y = (c * gy - s * gx).astype(F32)

    def edge(self, d: np.ndarray, width_px: float = 1.0) -> np.ndarray:
        """Coverage in [0, 1] of a signed distance field, anti-aliased over width_px pixels."""
        k = F32(1.0 / (width_px * self.px))
        return np.clip(F32(0.5) - d * k, F32(0.0), F32(1.0))

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """Normalised anatomical point -> (column, row) in pixels."""
        c, s = self._rot
        gx, gy = c * x - s * y, s * x + c * y
        return (gx + 1.0) / self.px - 0.5, (gy + 1.0) / self.px - 0.5

    def bbox(self, xs, ys, margin: float) -> tuple[slice, slice]:
        """Pixel slices (rows, cols) covering anatomical points xs, ys plus margin (normalised)."""
        cols, rows = zip(*(self.to_px(x, y) for x, y in zip(xs, ys)))
        m = margin / self.px + 2
        r0, r1 = int(max(0, min(rows) - m)), int(min(self.size, max(rows) + m + 1))
        c0, c1 = int(max(0, min(cols) - m)), int(min(self.size, max(cols) + m + 1))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def noise(self, rng: np.random.Generator, sl: tuple[slice, slice] | None = None) -> np.ndarray:
        """A random crop of a smooth noise field (unit variance), the size of the frame or sl."""
        bank = _noise_bank(self.size)
        i, r, c = (int(v) for v in rng.integers(0, (len(bank), self.size, self.size)))
        field = bank[i, r : r + self.size, c : c + self.size]
        return field if sl is None else field[sl]


def superellipse_sdf(dx, dy, a, b, p: float):
    """Approximate signed distance to a superellipse |dx/a|^p + |dy/b|^p = 1."""
    r = (np.abs(dx / a) ** p + np.abs(dy / b) ** p) ** (1.0 / p)
    return (r - 1.0) * min(a, b) if np.isscalar(a) and np.isscalar(b) else (r - 1.0) * np.minimum(a, b)


def segment_distance(X: np.ndarray, Y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from each pixel to a polyline pts (K, 2); X, Y shaped like the region."""
    a, b = pts[:-1], pts[1:]  # (K-1, 2)
    ab = b - a
    L2 = np.maximum((ab**2).sum(1), 1e-12)
    px, py = X[..., None], Y[..., None]
    t = np.clip(((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / L2, 0.0, 1.0)
    dx = px - (a[:, 0] + t * ab[:, 0])
    dy = py - (a[:, 1] + t * ab[:, 1])
    return np.sqrt((dx * dx + dy * dy).min(-1)).astype(F32)


def bezier(points, n: int = 20) -> np.ndarray:
    """n points along the Bezier curve with these control points (de Casteljau), (n, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    P = np.broadcast_to(np.asarray(points, dtype=np.float64), (n, len(points), 2))
    while P.shape[1] > 1:
        P = P[:, :-1] * (1 - t) + P[:, 1:] * t
    return P[:, 0]


@dataclass
class Body:
    """The drawn anatomy of one study, kept for the pathologies drawn over it."""

    density: np.ndarray  # (S, S) float32
    lung_sdf: np.ndarray  # (S, S) signed distance to either lung field (heart not removed)
    lungs: np.ndarray  # (S, S) coverage of the aerated lungs (heart removed)
    heart: np.ndarray  # (S, S) coverage of the heart
    body: np.ndarray  # (S, S) coverage of the body outline
    markings: np.ndarray  # (S, S) lung vessel markings already added to density
    anat: PatientAnatomy
    dome_y: tuple[float, float]  # (right, left) dome tops after inspiration
    heart_geom: tuple[float, float, float, float]  # centre x, centre y, half-width, half-height
    heart_ellipse: tuple[float, float, float, float]  # centre x, centre y, semi-axes (see heart_sdf)

    def lung_point(self, laterality: str, u: float, v: float) -> tuple[float, float]:
        """Lung-local (u: 0 medial .. 1 lateral, v: 0 apex .. 1 dome) -> normalised (x, y)."""
        a, s = self.anat, side_sign(laterality)
        dome = self.dome_y[0 if laterality == "right" else 1]
        return a.cx + s * (a.med_hw + u * (a.thorax_hw - a.med_hw)), a.apex_y + v * (dome - a.apex_y)


def lung_sdf(X, Y, anat: PatientAnatomy, domes: tuple[float, float]):
    """Signed distance to the two lung fields (mirror-symmetric shape, asymmetric domes)."""
    ax = np.abs(X - anat.cx) if isinstance(X, np.ndarray) else abs(X - anat.cx)
    half = (anat.thorax_hw - anat.med_hw) / 2.0
    lcx = anat.med_hw + half
    bottom = max(domes) + 0.2
    lcy, b = (anat.apex_y + bottom) / 2.0, (bottom - anat.apex_y) / 2.0
    taper = np.clip((Y - anat.apex_y) / b, 0.0, 1.0)
    a = half * (0.72 + 0.28 * taper)
    d_shape = superellipse_sdf(ax - lcx, Y - lcy, a, b, anat.lung_p)
    left = (X - anat.cx) > 0
    dome = np.where(left, domes[1], domes[0])
    dcx = lcx - 0.2 * half
    d_dome = Y - (dome + 0.2 * ((ax - dcx) / half) ** 2)
    return np.maximum(d_shape, d_dome)


def heart_geometry(anat: PatientAnatomy, ctr: float, domes: tuple[float, float]):
    """Tilted ellipse whose horizontal extent is ctr * thoracic width; 1/3 lies right of the midline."""
    t = anat.heart_tilt
    w = ctr * 2.0 * anat.thorax_hw
    a1 = (w / 2.0) / math.sqrt(math.cos(t) ** 2 + (0.72 * math.sin(t)) ** 2)
    a2 = 0.72 * a1
    vhalf = math.sqrt((a1 * math.sin(t)) ** 2 + (a2 * math.cos(t)) ** 2)
    hx = anat.cx + w * (0.5 - 0.34)
    hy = domes[1] + 0.12 - 0.75 * vhalf
    return hx, hy, a1, a2, w / 2.0, vhalf


def heart_sdf(X, Y, geom, tilt: float):
    hx, hy, a1, a2 = geom[:4]
    c, s = math.cos(tilt), math.sin(tilt)
    dx, dy = X - hx, Y - hy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (np.sqrt((u / a1) ** 2 + (v / a2) ** 2) - 1.0) * a2


def render_anatomy(cv: Canvas, anat: PatientAnatomy, view: StudyView, ctr: float,
                   rng: np.random.Generator) -> Body:
    """Body outline, lungs with markings, heart and mediastinum, diaphragm, bones."""
    X, Y = cv.X, cv.Y
    domes = (anat.dome_y + view.inspiration, anat.dome_y + anat.dome_drop + view.inspiration)
    ax = np.abs(X - anat.cx)
    # Body: torso superellipse with rounded shoulders, the neck, and arms at the sides.
    torso = superellipse_sdf(ax, Y - 0.35, anat.body_hw, 1.25, 5.0)
    neck = superellipse_sdf(ax, Y + 1.0, 0.22, 0.45, 2.5)
    body = cv.edge(np.minimum(torso, neck), 1.5)
    dens = SOFT_TISSUE * body
    dens += F32(0.05) * cv.edge(torso + 0.05, 6)  # thicker tissue in the torso than in the arms

    lsdf = lung_sdf(X, Y, anat, domes).astype(F32)
    hgeom = heart_geometry(anat, ctr, domes)
    heart = cv.edge(heart_sdf(X, Y, hgeom, anat.heart_tilt), 1.2)
    knob = cv.edge(np.hypot(X - anat.cx - anat.med_hw - 0.02, Y - anat.carina_y + 0.1) - 0.075, 1.2)
    lungs = cv.edge(lsdf, 1.2) * (1.0 - np.maximum(heart, knob))
    # Aerated lung is dark; the bases and the hila carry more soft tissue than the apices.
    v = np.clip((Y - anat.apex_y) / (domes[1] - anat.apex_y), 0.0, 1.0)
    dens -= lungs * (F32(0.4) - F32(0.07) * v)
    dens += heart * F32(0.03) * cv.edge(Y - domes[1] - 0.05, 3)  # under the diaphragm it is unseen

    markings = _lung_markings(cv, anat, rng) * lungs
    dens += markings
    _draw_bones(cv, anat, dens, lsdf, lungs, rng)
    _draw_airways(cv, anat, dens)
    gx, gy = anat.cx + 0.3, domes[1] + 0.1  # gastric bubble under the left dome
    sl = cv.bbox([gx], [gy], 0.12)
    dens[sl] -= F32(0.18) * cv.edge(np.hypot((X[sl] - gx) / 1.5, Y[sl] - gy) - 0.045, 2)
    return Body(dens, lsdf, lungs, heart, body, markings, anat, domes,
                (hgeom[0], hgeom[1], hgeom[4], hgeom[5]), hgeom[:4])


def _lung_markings(cv: Canvas, anat: PatientAnatomy, rng: np.random.Generator) -> np.ndarray:
    """Vessels fanning out from the hila: angular streaks that fade towards the periphery."""
    X, Y = cv.X, cv.Y
    hx, hy = anat.med_hw - 0.03, anat.carina_y + 0.2
    dx, dy = np.abs(X - anat.cx) - hx, Y - hy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    k = rng.uniform(14, 20)
    wobble = F32(3.0) * cv.noise(rng)
    streak = np.cos(k * theta + wobble + r * F32(4.0)) + F32(0.6) * np.cos(F32(1.7 * k) * theta - wobble)
    streak = (np.maximum(streak, F32(0.5)) - F32(0.5)) * F32(0.8) * (F32(1.0) - np.exp(-(r * F32(6.0)) ** 2))
    fade = np.exp(-r * F32(2.4))
    hilum = np.exp(-(r * F32(9.0)) ** 2)  # the hilar vessels themselves
    return (F32(0.13) * fade * (streak + F32(0.25) * cv.noise(rng)) + F32(0.12) * hilum).astype(F32)


def _draw_bones(cv: Canvas, anat: PatientAnatomy, dens: np.ndarray, lsdf: np.ndarray,
                lungs: np.ndarray, rng: np.random.Generator) -> None:
    X, Y = cv.X, cv.Y
    ax = np.abs(X - anat.cx)
    # Posterior ribs: level sets of t, arching up from the spine and down laterally;
    # the spacing grows towards the bases.
    t = Y + anat.rib_c1 * ax - anat.rib_c2 * ax * ax - anat.apex_y + 0.05
    phase = np.maximum(t, 0.0) ** 0.9 / anat.rib_spacing
    band = np.cos(F32(2 * math.pi) * phase)
    sharp = max(2.0, 0.35 * anat.rib_spacing / cv.px)
    ribs = np.clip((band - F32(0.25)) * F32(sharp), 0.0, 1.0)
    # Ribs show best against aerated lung, faintly over the mediastinum and soft tissue.
    cage = cv.edge(lsdf - 0.05, 4) * (F32(0.3) + F32(0.7) * lungs)
    dens += F32(0.1) * ribs * cage
    # Anterior ribs: fainter bands sloping down towards the midline.
    ant = np.cos(F32(2 * math.pi) * (Y + 0.35 * ax) / (1.6 * anat.rib_spacing) + rng.uniform(0, 6.3))
    dens += F32(0.045) * np.clip(ant * F32(3.0), 0.0, 1.0) * cage
    # Spine: a bright column with vertebral bodies, behind the mediastinum.
    cols = cv.bbox([anat.cx - 0.1, anat.cx + 0.1], [-1.0, 1.0], 0.02)
    sx, sy = X[cols] - anat.cx, Y[cols]
    column = cv.edge(np.abs(sx) - 0.055, 1.5)
    vert = F32(0.85) + F32(0.15) * np.cos(F32(2 * math.pi) * sy / F32(0.105))
    dens[cols] += F32(0.09) * column * vert
    # Clavicles: S-shaped bands from the sternal notch out to the shoulders.
    y0 = anat.apex_y + 0.12
    rows = cv.bbox([anat.cx - 0.7, anat.cx + 0.7], [y0 - 0.25, y0 + 0.1], 0.02)
    cax, cy = np.abs(X[rows] - anat.cx), Y[rows]
    yc = y0 - 0.28 * (cax - 0.08) + 0.04 * np.sin((cax - 0.08) * F32(7.0))
    clav = cv.edge(np.abs(cy - yc) - 0.034, 1.2) * cv.edge(np.abs(cax - 0.37) - 0.3, 1.5)
    dens[rows] += F32(0.16) * clav
    # Humeral heads at the shoulders.
    hy = anat.apex_y + 0.02
    for s in (-1, 1):
        hx = anat.cx + s * (0.88 * anat.body_hw - 0.05)
        sl = cv.bbox([hx], [hy], 0.12)
        dens[sl] += F32(0.13) * cv.edge(np.hypot(X[sl] - hx, Y[sl] - hy) - 0.09, 1.5)


def _draw_airways(cv: Canvas, anat: PatientAnatomy, dens: np.ndarray) -> None:
    """Trachea (dark air column) down to the carina, and the two main bronchi."""
    cy = anat.carina_y
    sl = cv.bbox([anat.cx - 0.25, anat.cx + 0.25], [-1.0, cy + 0.2], 0.02)
    X, Y = cv.X[sl], cv.Y[sl]
    pts_t = np.array([[anat.cx, -1.1], [anat.cx, cy]])
    pts_r = np.array([[anat.cx, cy], [anat.cx - 0.12, cy + 0.12]])
    pts_l = np.array([[anat.cx, cy], [anat.cx + 0.16, cy + 0.14]])
    d = np.minimum(segment_distance(X, Y, pts_t) - 0.032,
                   np.minimum(segment_distance(X, Y, pts_r), segment_distance(X, Y, pts_l)) - 0.018)
    dens[sl] -= F32(0.13) * cv.edge(d, 1.5)


def finalize(cv: Canvas, dens: np.ndarray, metal: np.ndarray, view: StudyView,
             rng: np.random.Generator) -> np.ndarray:
    """Density -> film brightness (exposure, gamma), metal on top, blur, quantum noise -> uint8."""
    img = np.clip((dens - F32(view.offset)) * F32(view.gain), 0.0, 1.0)
    img **= F32(view.gamma)
    img += metal * (F32(1.0) - img)
    if view.blur:
        img[1:-1] = (img[:-2] + 2 * img[1:-1] + img[2:]) * F32(0.25)
        img[:, 1:-1] = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) * F32(0.25)
    # A film rendered at S < 512 px is a 512-px film averaged over (512/S)^2 pixels: noise std / (512/S).
    img += rng.standard_normal(img.shape, dtype=F32) * F32(view.noise * min(1.0, cv.size / 512))
    return (np.clip(img, 0.0, 1.0) * F32(255.0) + F32(0.5)).astype(np.uint8)
