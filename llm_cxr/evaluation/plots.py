"""PNG figures of evaluation results (matplotlib, drawn off-screen)."""

from __future__ import annotations

import io
import logging
from typing import Mapping, Sequence

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def bars_png(values: Mapping[str, Mapping[str, float]], classes: Sequence[str], title: str, xlabel: str,
             support: Mapping[str, int] | None = None) -> bytes | None:
    """Horizontal bars per class, one colour per series (``{series: {class: value}}``); PNG bytes."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(classes) + 1.4), dpi=110)
    height = 0.8 / max(1, len(values))
    y = np.arange(len(classes))
    for k, (series, per_class) in enumerate(values.items()):
        ax.barh(y + k * height, [per_class.get(c, 0.0) for c in classes], height=height, label=series)
    names = [f"{c} (n={support[c]})" if support else c for c in classes]
    ax.set_yticks(y + height * (len(values) - 1) / 2, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if len(values) > 1:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def per_class_f1_png(systems: Mapping[str, Mapping[str, Mapping[str, dict]]], classes: Sequence[str]
                     ) -> bytes | None:
    """Per-class F1 (uncertain as positive) of one or more systems' reports."""
    values = {name: {c: v["f1"] for c, v in pc["uncertain_as_positive"].items()} for name, pc in systems.items()}
    first = next(iter(systems.values()))["uncertain_as_positive"]
    return bars_png(values, classes, "Clinical efficacy per CheXpert class (labeler on both reports)", "F1",
                    {c: first[c]["support"] for c in classes})
