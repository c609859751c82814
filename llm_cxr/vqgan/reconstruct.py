"""Reconstruct image files (PNG, JPEG, DICOM, any size) through a VQ-GAN; bad files are skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from llm_cxr.data.images import load_image
from llm_cxr.errors import InputError
from llm_cxr.vqgan.metrics import psnr, ssim
from llm_cxr.vqgan.model import VQGAN

log = logging.getLogger(__name__)


def reconstruct_files(model_path: str | Path, files: Sequence[str | Path], out: str | Path,
                      progress: bool = True) -> dict:
    """Write NAME_recon.png (and NAME_input.png, the model-size input) per file and ``results.json``."""
    from tqdm.auto import tqdm

    model = VQGAN.from_pretrained(model_path)
    r = model.config.resolution
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, bad = [], []
    names = output_names([Path(f) for f in files])
    for f in tqdm(list(files), desc="reconstructing", disable=not progress):
        f = Path(f)
        try:
            img = load_image(f, size=r)
        except InputError as e:
            bad.append({"item": str(f), "problem": str(e)})
            log.warning("skipped %s: %s", f, e)
            continue
        x = model.to_tensor([img], resize="silent")
        rec = model.decode(model.encode(x))
        name = names[str(f)]
        model.to_pil(rec)[0].save(out / f"{name}_recon.png")
        img.save(out / f"{name}_input.png")
        rows.append({"file": str(f), "output": f"{name}_recon.png", "psnr": float(psnr(x, rec)[0]),
                     "ssim": float(ssim(x, rec)[0])})
    mean = sum(r_["psnr"] for r_ in rows) / len(rows) if rows else None
    result = {"n_ok": len(rows), "n_bad": len(bad), "mean_psnr": mean, "images": rows, "bad_items": bad}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "results.json")
    return result


def output_names(files: Sequence[Path]) -> dict[str, str]:
    """A distinct output stem per input: the file's stem, with its extension (``a_jpg``) and then a number added
    where two inputs would share one (``a.png`` and ``a.jpg``; ``x/a.png`` and ``y/a.png``)."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    names, used = {}, set()
    for f in files:
        base = f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower() or 'file'}"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[str(f)] = name
    return names
