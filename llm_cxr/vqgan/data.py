"""Images of an llm-cxr dataset as tensors the VQ-GAN takes: (C, R, R) float in [-1, 1]."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llm_cxr.data.images import to_model_size
from llm_cxr.errors import InputError

log = logging.getLogger(__name__)

# Decoded images are kept in memory as uint8 while they fit in this many bytes.
PRELOAD_LIMIT = 2 * 1024**3
_WARNED_SIZES: set = set()


def image_to_array(img: Image.Image, resolution: int, channels: int, resize: str = "silent",
                   name: str = "image") -> np.ndarray:
    """PIL image -> uint8 (C, R, R), converted and resized as the model needs."""
    if img.size != (resolution, resolution):
        if resize == "error":
            raise InputError(f"{name} is {img.size[0]}x{img.size[1]}; the model takes {resolution}x{resolution} "
                             f"(pass resize='warn' or 'silent' to resize)")
        if resize == "warn" and (img.size, resolution) not in _WARNED_SIZES:
            _WARNED_SIZES.add((img.size, resolution))  # once per size: a dataset would flood the log
            log.warning("%s is %dx%d; resizing to %dx%d (further %dx%d images are resized without a message)",
                        name, *img.size, resolution, resolution, *img.size)
        img = to_model_size(img, resolution)
    a = np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1).copy()


def to_unit_range(a: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return a.float() / 127.5 - 1.0


class ImageTensorDataset(Dataset):
    """The ``image`` column of a dataset; decoded once into memory when it fits."""

    def __init__(self, ds, resolution: int, channels: int, resize: str = "silent", progress: bool = True,
                 preload: bool | None = None) -> None:
        self.ds = ds.select_columns(["image", "id"])
        self.resolution, self.channels, self.resize = resolution, channels, resize
        size = len(ds) * channels * resolution * resolution
        self.cache: torch.Tensor | None = None
        if preload or (preload is None and size <= PRELOAD_LIMIT):
            self.cache = self._decode_all(progress)

    def _decode_all(self, progress: bool) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = torch.empty(len(self.ds), self.channels, self.resolution, self.resolution, dtype=torch.uint8)
        i = 0
        with tqdm(total=len(self.ds), desc="decoding images", disable=not progress, leave=False) as bar:
            for batch in self.ds.iter(batch_size=256):
                for img, name in zip(batch["image"], batch["id"]):
                    out[i] = torch.from_numpy(image_to_array(img, self.resolution, self.channels, self.resize, name))
                    i += 1
                bar.update(len(batch["id"]))
        return out

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            return to_unit_range(self.cache[i])
        row = self.ds[int(i)]
        return to_unit_range(torch.from_numpy(image_to_array(row["image"], self.resolution, self.channels,
                                                             self.resize, row["id"])))
