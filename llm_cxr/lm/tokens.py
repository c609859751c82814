"""The image-token vocabulary: VQ-GAN codes <-> token ids of any Hugging Face causal LM.

One function, :func:`add_image_tokens`, extends a tokenizer with ``<img_0>`` ...
``<img_{K-1}>`` for a K-entry codebook plus the boundary tokens ``<image>`` and ``</image>``,
and resizes the model; training and inference both call it, so the ids can never disagree.
Nothing assumes a text vocabulary size (LLM-CXR hard-coded 50281). The mapping is saved with
a run (``image_tokens.json``) together with what it was made for (codebook size, grid,
VQ-GAN config fingerprint) and checked against the VQ-GAN on load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_cxr.errors import ConfigError, InputError

log = logging.getLogger(__name__)

TOKENS_FILE = "image_tokens.json"
BEGIN_IMAGE, END_IMAGE = "<image>", "</image>"


def image_token(code: int) -> str:
    return f"<img_{code}>"


@dataclass(frozen=True)
class ImageTokenMap:
    """Where the image tokens live in the vocabulary, and what VQ-GAN they belong to."""

    first_id: int  # id of <img_0>; codes occupy first_id .. first_id + n_codes - 1
    n_codes: int
    begin_id: int  # <image>
    end_id: int  # </image>
    grid_size: int  # the VQ-GAN's code grid side (grid_size**2 tokens per image)
    vqgan_fingerprint: str
    vocab_size: int  # the tokenizer's length after extension
    # hash of the VQ-GAN's weights whose codes the model was trained on (None: a run saved before it was recorded);
    # the config fingerprint alone cannot tell two trainings of one architecture apart
    vqgan_weights: str | None = None

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    @property
    def image_ids(self) -> range:
        return range(self.first_id, self.first_id + self.n_codes)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape) -> token ids. Codes outside the codebook are an error."""
        codes = torch.as_tensor(codes)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codes):
            raise InputError(f"codes must lie in [0, {self.n_codes - 1}]; found {int(codes.min())}..{int(codes.max())}")
        return codes.long() + self.first_id

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> codes. An id that is not an image token is an error."""
        ids = torch.as_tensor(ids).long()
        bad = (ids < self.first_id) | (ids >= self.first_id + self.n_codes)
        if bool(bad.any()):
            raise InputError(f"{int(bad.sum())} id(s) are not image tokens (expected {self.first_id}.."
                             f"{self.first_id + self.n_codes - 1}), e.g. {ids[bad][:5].tolist()}")
        return ids - self.first_id

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        return (ids >= self.first_id) & (ids < self.first_id + self.n_codes)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENS_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ImageTokenMap":
        path = Path(folder) / TOKENS_FILE
        if not path.exists():
            raise ConfigError(f"{folder} has no {TOKENS_FILE}: it is not an llm-cxr language-model run")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a valid image-token map: {e}") from e

    def check_vqgan(self, n_embed: int, grid_size: int, fingerprint: str, source: str = "the VQ-GAN",
                    weights: str | None = None) -> None:
        """Refuse a VQ-GAN whose codes would mean something else to this model (``weights``: its weights hash, checked
        when both sides know theirs)."""
        problems = []
        if n_embed != self.n_codes:
            problems.append(f"codebook size: the model was trained with {self.n_codes}, {source} has {n_embed}")
        if grid_size != self.grid_size:
            problems.append(f"grid: the model was trained with {self.grid_size}x{self.grid_size}, "
                            f"{source} gives {grid_size}x{grid_size}")
        if fingerprint != self.vqgan_fingerprint:
            problems.append(f"config fingerprint: trained with {self.vqgan_fingerprint}, {source} is {fingerprint}")
        elif weights and self.vqgan_weights and weights != self.vqgan_weights:
            problems.append(f"weights: trained on the codes of VQ-GAN weights {self.vqgan_weights}, {source} has "
                            f"weights {weights} (the same architecture, trained apart: its codes mean other things)")
        if problems:
            raise ConfigError("the language model and the VQ-GAN do not match: " + "; ".join(problems))


def add_image_tokens(tokenizer, model, n_codes: int, grid_size: int, vqgan_fingerprint: str,
                     vqgan_weights: str | None = None) -> ImageTokenMap:
    """Extend ``tokenizer`` (and ``model``, if given) with image and boundary tokens.

    Idempotent: a tokenizer that already has exactly these tokens is left alone. New embedding
    rows (input and, if untied, output) start at the mean of the existing rows.
    """
    if n_codes <= 0 or grid_size <= 0:
        raise ConfigError(f"n_codes and grid_size must be > 0, got {n_codes} and {grid_size}")
    wanted = [image_token(i) for i in range(n_codes)] + [BEGIN_IMAGE, END_IMAGE]
    vocab = tokenizer.get_vocab()
    present = [t for t in wanted if t in vocab]
    if present and len(present) != len(wanted):
        raise ConfigError(f"the tokenizer has {len(present)} of the {len(wanted)} image tokens: it was extended for "
                          f"another codebook size (found e.g. {present[:3]})")
    if not present:
        added = tokenizer.add_tokens(wanted, special_tokens=True)
        log.info("added %d image tokens to the tokenizer (now %d)", added, len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(wanted)
    first = ids[0]
    if ids[:n_codes] != list(range(first, first + n_codes)):
        raise ConfigError("image tokens did not receive consecutive ids; the tokenizer reorders added tokens")
    if model is not None:
        _resize_with_mean(model, len(tokenizer), first)
    return ImageTokenMap(first_id=first, n_codes=n_codes, begin_id=ids[-2], end_id=ids[-1], grid_size=grid_size,
                         vqgan_fingerprint=vqgan_fingerprint, vocab_size=len(tokenizer), vqgan_weights=vqgan_weights)


def _resize_with_mean(model, new_size: int, first_new: int) -> None:
    """Grow the embeddings to ``new_size`` rows; rows from ``first_new`` on start at the mean of the rows before.

    A model whose matrix is already big enough (a trained run being reloaded) is left alone.
    Rows between the tokenizer's old length and the matrix's (Pythia pads 50277 to 50304)
    were never trained, so they are re-initialised too.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if old >= new_size:
        return
    start = min(first_new, old)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[start:] = emb[:start].mean(0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[start:] = out.weight[:start].mean(0, keepdim=True)
            if getattr(out, "bias", None) is not None:
                out.bias[start:] = out.bias[:start].mean()


def init_image_rows_from_codebook(model, token_map: ImageTokenMap, codebook: torch.Tensor, seed: int = 0) -> None:
    """Start each ``<img_k>`` row at the mean row plus a fixed projection of codebook vector k.

    With the default (mean) start every image token is the same vector, and the model has to
    learn each code's meaning from scratch before it can read an image; in our measurements a
    small model then learns the text prior and ignores the image. Projecting the VQ-GAN's own
    codebook (centred, through a random orthonormal map, scaled to the spread of the existing
    rows) gives similar codes similar embeddings from the first step. Applied to the input
    embeddings and, when untied, to the output head.
    """
    codebook = torch.as_tensor(codebook, dtype=torch.float32)
    if codebook.ndim != 2 or codebook.shape[0] != token_map.n_codes:
        raise ConfigError(f"codebook of shape {tuple(codebook.shape)} does not match the {token_map.n_codes} "
                          "image tokens")
    centred = codebook - codebook.mean(0, keepdim=True)
    centred = centred / centred.std().clamp_min(1e-8)
    g = torch.Generator().manual_seed(seed)
    first, last = token_map.first_id, token_map.first_id + token_map.n_codes

    def fill(weight: torch.Tensor) -> None:
        hidden = weight.shape[1]
        proj = torch.randn(centred.shape[1], hidden, generator=g)
        if centred.shape[1] <= hidden:  # orthonormal rows: the projection keeps distances
            proj = torch.linalg.qr(proj.T).Q.T
        vec = centred @ proj
        base = weight[:first].float()
        vec = vec / vec.std().clamp_min(1e-8) * base.std(0).mean()
        weight[first:last] = (base.mean(0, keepdim=True) + vec).to(weight.dtype)

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        fill(emb)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            fill(out.weight)
