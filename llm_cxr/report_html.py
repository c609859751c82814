"""Pages a person opens: contact sheets of datasets and the demo's ``index.html``.

Plain HTML with images written as PNG files beside the page (no JavaScript, no external
assets), so the folder can be zipped, mailed or served as it is.
"""

from __future__ import annotations

import html
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

# Mask overlay colours (RGB), one per finding name, stable across pages.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (170, 110, 40),
]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:8px 0 20px} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:300px;font-size:13px}
.card img{width:140px;height:140px;image-rendering:pixelated;background:#000}
.card .imgs{display:flex;gap:6px} .rep{white-space:pre-wrap;margin-top:6px}
.tag{display:inline-block;padding:1px 6px;margin:1px;border-radius:8px;color:#fff;font-size:11px}
.muted{color:#777}
.card.wide{width:640px;display:flex;gap:10px} .card.wide p{margin:4px 0}
.tag.agree{background:#2e7d32} .tag.missed{background:#c62828} .tag.extra{background:#ef6c00}
.tag.side{background:#6a1b9a}
figure{margin:0} figcaption{font-size:11px;color:#666;text-align:center}
"""


def colour_for(name: str, names: Sequence[str]) -> tuple[int, int, int]:
    try:
        i = list(names).index(name)
    except ValueError:
        i = zlib.crc32(name.encode())  # hash() is randomised per process
    return _PALETTE[i % len(_PALETTE)]


def overlay_masks(image: Image.Image, masks: Iterable[tuple[str, Image.Image]], names: Sequence[str],
                  alpha: float = 0.45) -> Image.Image:
    """The image in RGB with each finding's mask tinted in its colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    for name, mask in masks:
        m = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) > 127
        col = np.array(colour_for(name, names), dtype=np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * col
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def contact_sheet_png(images: Sequence[Image.Image], cols: int = 4, pad: int = 2) -> Image.Image:
    """A grid of equally sized grayscale/RGB images on a black background."""
    if not images:
        raise ValueError("contact_sheet_png needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


@dataclass
class Page:
    """An HTML page built from sections; ``write`` puts it at ``folder/name``."""

    title: str
    subtitle: str = ""
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def table(self, rows: Sequence[dict[str, Any]], caption: str = "") -> None:
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")

    def cards(self, cards: Sequence[str]) -> None:
        self.parts.append('<div class="grid">' + "".join(cards) + "</div>")

    def render(self) -> str:
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}"
            + "\n".join(self.parts)
            + "</body></html>\n"
        )

    def write(self, folder: Path, name: str = "index.html") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(self.render())
        return path


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def study_card(img_src: Sequence[tuple[str, str]], title: str, text: str,
               tags: Sequence[tuple[str, tuple]] = ()) -> str:
    """One study: images (src, alt), a title, tags (label, colour) and the report text."""
    imgs = "".join(f'<img src="{html.escape(s)}" alt="{html.escape(a)}" title="{html.escape(a)}">' for s, a in img_src)
    tag_html = "".join(
        f'<span class="tag" style="background:rgb{c}">{html.escape(t)}</span>' for t, c in tags
    )
    return (f'<div class="card"><b>{html.escape(title)}</b><div class="imgs">{imgs}</div>'
            f'<div>{tag_html}</div><div class="rep">{html.escape(text)}</div></div>')


def dataset_cards(ds, asset_dir: Path, rel: str, n: int = 16) -> list[str]:
    """Cards for the first ``n`` rows of a dataset: image, image with masks, tags, report."""
    from llm_cxr.data.schema import FINDING_NAMES, findings_from_json

    asset_dir.mkdir(parents=True, exist_ok=True)
    cards = []
    for i in range(min(n, len(ds))):
        row = ds[i]
        img = row["image"].convert("L")
        img.save(asset_dir / f"{row['id']}.png")
        masks = [(m["finding"], m["mask"]) for m in row["masks"]]
        srcs = [(f"{rel}/{row['id']}.png", "image")]
        if masks:
            overlay_masks(img, masks, FINDING_NAMES).save(asset_dir / f"{row['id']}_masks.png")
            srcs.append((f"{rel}/{row['id']}_masks.png", "finding masks"))
        tags = []
        for f in findings_from_json(row["findings"]):
            words = " ".join(w for w in (f.laterality, f.severity, f.name.replace("_", " ")) if w)
            tags.append((words, colour_for(f.name, FINDING_NAMES)))
        title = f"{row['id']} · {row['split']}"
        cards.append(study_card(srcs, title, row["report"] or "(no report)", tags))
    return cards


def write_contact_sheet(ds, out: Path, n: int = 16, title: str = "llm-cxr dataset") -> Path:
    """``out/contact_sheet.png`` (images only) and ``out/index.html`` (images, masks, reports)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(n, len(ds))
    images = [ds[i]["image"] for i in range(n)]
    contact_sheet_png(images).save(out / "contact_sheet.png")
    page = Page(title, f"{len(ds)} images; first {n} shown")
    page.raw('<img src="contact_sheet.png" style="max-width:100%">')
    page.cards(dataset_cards(ds, out / "assets", "assets", n))
    return page.write(out)


def dump_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
