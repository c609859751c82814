"""Encode a dataset's images into VQ-GAN codes: adds a ``codes`` column (int16, (h*w,)).

``datasets.map`` writes batch by batch to Arrow files, so memory stays flat however large
the dataset; its cache is keyed on the input dataset and a hash of the model's weights, so
encoding the same data with the same model again is free. Under accelerate with several
processes each process encodes a contiguous shard and the main process joins them.
The output folder records which model made the codes (``vqgan.json``), so a language-model
run can refuse codes from another tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from llm_cxr.errors import DatasetError
from llm_cxr.vqgan.data import image_to_array, to_unit_range
from llm_cxr.vqgan.model import VQGAN

log = logging.getLogger(__name__)

CODES_INFO = "vqgan.json"


def weights_hash(model: VQGAN) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def codes_info(model: VQGAN, model_path: str | Path | None = None) -> dict:
    c = model.config
    return {"model_path": str(model_path) if model_path else None, "fingerprint": c.fingerprint(),
            "weights": weights_hash(model), "n_embed": c.n_embed, "grid_size": c.grid_size,
            "resolution": c.resolution, "channels": c.in_channels}


def _encode_fn(model: VQGAN, resize: str, autocast: bool):
    r, ch = model.config.resolution, model.config.in_channels

    def fn(batch):
        arr = np.stack([image_to_array(im, r, ch, resize, name=i) for im, i in zip(batch["image"], batch["id"])])
        x = to_unit_range(torch.from_numpy(arr))
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=autocast):
            codes = model.encode(x)
        return {"codes": codes.flatten(1).to(torch.int16).cpu().numpy()}

    return fn


def encode_dataset(model_path: str | Path, data: str | Path, out: str | Path, batch_size: int = 64,
                   autocast: bool = False, resize: str = "warn", progress: bool = True, accelerator=None,
                   chunk_size: int = 10_000) -> dict:
    """Encode every image of dataset ``data`` with the VQ-GAN at ``model_path`` into ``out``.

    Each process encodes its rows in pieces of ``chunk_size``, each cached in a file of its own beside ``out``
    (written whole, then renamed, by ``datasets``): a rerun after a kill reuses the finished pieces and encodes
    the rest, and the result is the same as an uninterrupted run's."""
    import datasets

    from llm_cxr.data.dataset import load_dataset

    out = Path(out)
    if chunk_size <= 0:
        raise DatasetError(f"chunk_size must be > 0, got {chunk_size}")
    if out.resolve() == Path(data).resolve():
        raise DatasetError(f"--out {out} must differ from --data (the input is read while the output is written)")
    if accelerator is None:
        from llm_cxr.accel import make_accelerator

        accelerator = make_accelerator("no")
    model = VQGAN.from_pretrained(model_path, device=accelerator.device)
    info = codes_info(model, model_path)
    ds = load_dataset(data)
    if "codes" in ds.column_names:
        ds = ds.remove_columns("codes")
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    shard = ds.shard(n_proc, rank, contiguous=True) if n_proc > 1 else ds
    features = shard.features.copy()
    features["codes"] = datasets.List(datasets.Value("int16"), length=model.config.num_codes_per_image)
    fp = hashlib.sha256(f"{shard._fingerprint}:{info['weights']}:{resize}:{autocast}".encode()).hexdigest()[:16]
    tmp = out.parent / f".{out.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # the map's cache (and the temporary files a kill would leave) go beside the output, never into the input
        # dataset's folder; a rerun after a kill finds a finished cache there and reuses it
        starts = range(0, max(len(shard), 1), chunk_size)
        caches = [tmp / f"cache-{fp}-{chunk_size}-rank{rank}-{i:05d}.arrow" for i in range(len(starts))]
        done = sum(c.exists() for c in caches)
        if done:
            log.info("resuming: %d of %d pieces of rank %d already encoded", done, len(caches), rank)
        fn = _encode_fn(model, resize, autocast)
        parts = [shard.select(range(a, min(a + chunk_size, len(shard)))).map(
                     fn, batched=True, batch_size=batch_size, features=features, new_fingerprint=f"{fp}-{i}",
                     desc=f"encoding (rank {rank}, piece {i + 1}/{len(starts)})", disable_nullable=True,
                     cache_file_name=str(cache))
                 for i, (a, cache) in enumerate(zip(starts, caches))]
        encoded = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if n_proc > 1:
            encoded.save_to_disk(str(tmp / f"rank{rank}"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if n_proc > 1:
                parts = [datasets.load_from_disk(str(tmp / f"rank{r}")) for r in range(n_proc)]
                encoded = datasets.concatenate_datasets(parts)
            staged = tmp / "dataset"
            shutil.rmtree(staged, ignore_errors=True)  # half of one, from a run killed while saving
            encoded.save_to_disk(str(staged))
            (staged / CODES_INFO).write_text(json.dumps(info, indent=2) + "\n")
            for f in ("summary.json", "bad_items.jsonl"):
                if (Path(data) / f).exists():
                    shutil.copy(Path(data) / f, staged / f)
            if out.exists():
                shutil.rmtree(out)
            staged.rename(out)
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("encoded %d images into %s", len(encoded), out)
    except BaseException:
        _drop_partial(tmp)
        raise
    accelerator.wait_for_everyone()
    return {**info, "n": len(ds), "out": str(out)}


def _drop_partial(tmp: Path) -> None:
    """After a failure (a full disk, say): remove what is half-written in ``tmp`` (datasets' temporary files, a
    staged copy) and keep the finished caches, which a rerun reuses."""
    for p in tmp.iterdir() if tmp.is_dir() else ():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif not p.name.startswith("cache-"):
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        tmp.rmdir()  # when nothing finished is left


def read_codes_info(data: str | Path) -> dict:
    path = Path(data) / CODES_INFO
    if not path.exists():
        raise DatasetError(f"{data} has no {CODES_INFO}: encode it with `llm-cxr vqgan encode` first")
    return json.loads(path.read_text())


__all__ = ["CODES_INFO", "codes_info", "encode_dataset", "read_codes_info", "weights_hash"]
