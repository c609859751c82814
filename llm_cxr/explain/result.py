"""An explanation: maps per target, saved and loaded as JSON + NumPy, plotted as overlays or highlighted words."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llm_cxr.errors import InputError

RESULT_FILE = "explanation.json"
MAPS_FILE = "maps.npy"


def normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (M2IB's normalisation); a constant map becomes zeros."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


@dataclass
class Explanation:
    """``maps``: image -> report (K, H, W) over the code grid; report -> image (K, words). One map per target."""

    direction: str
    method: str
    targets: list[str]
    maps: np.ndarray
    report: str = ""
    words: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / MAPS_FILE, np.asarray(self.maps, dtype=np.float32))
        meta = {k: v for k, v in asdict(self).items() if k != "maps"}
        tmp = folder / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(folder / RESULT_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Explanation:
        folder = Path(folder)
        try:
            meta = json.loads((folder / RESULT_FILE).read_text())
            maps = np.load(folder / MAPS_FILE, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{folder} holds no readable explanation ({RESULT_FILE} and {MAPS_FILE}): {e}") from e
        return cls(maps=maps, **meta)

    def plot(self, folder: str | Path, image=None) -> list[Path]:
        """image -> report: one PNG per target, the map (bilinear, min-max) over ``image`` (a PIL image; the grid
        alone without one); report -> image: one HTML page with each target's words highlighted."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.maps.ndim == 3:
            return [_overlay(m, image, folder / f"map_{i:02d}.png") for i, m in enumerate(self.maps)]
        return [_words_page(self, folder / "words.html")]


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB (H, W, 3) uint8: dark blue through red to yellow."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[20, 30, 120], [200, 40, 40], [255, 230, 60]], dtype=np.float32)
    lo = stops[0] + (stops[1] - stops[0]) * np.clip(v * 2, 0, 1)
    hi = stops[1] + (stops[2] - stops[1]) * np.clip(v * 2 - 1, 0, 1)
    return np.where(v < 0.5, lo, hi).astype(np.uint8)


def _overlay(grid_map: np.ndarray, image, path: Path) -> Path:
    from PIL import Image

    size = image.size if image is not None else (256, 256)
    heat = Image.fromarray((normalise(grid_map) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    rgb = Image.fromarray(_heat(np.asarray(heat, dtype=np.float32) / 255))
    if image is not None:
        rgb = Image.blend(image.convert("RGB"), rgb, 0.45)
    rgb.save(path)
    return path


def _words_page(ex: Explanation, path: Path) -> Path:
    rows = []
    for target, scores in zip(ex.targets, ex.maps):
        s = normalise(scores)
        spans = "".join(f'<span style="background: rgba(220,50,40,{0.08 + 0.8 * float(v):.2f})" '
                        f'title="{float(v):.2f}">{html.escape(w)}</span> ' for w, v in zip(ex.words, s))
        rows.append(f"<h3>{html.escape(target)}</h3><p>{spans}</p>")
    path.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(ex.method)}: which words drew the "
                    f"image</title><body style='font-family: sans-serif; max-width: 60em'>"
                    f"<h2>{html.escape(ex.method)}: which words drove the drawing</h2>{''.join(rows)}</body>")
    return path


__all__ = ["Explanation", "MAPS_FILE", "RESULT_FILE", "normalise"]
