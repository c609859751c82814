"""Reference systems to score beside a model: what a report generator has to beat.

``nearest_report`` is the classic retrieval baseline of report generation (e.g. the "1-NN" rows of
Liu et al., CVPR 2019 and of R2Gen's comparisons): each test image gets the report of the most
similar training image. Similarity is measured on the VQ-GAN codes the language model reads:
tf-idf weighted histograms of codes per region of the grid (a coarse grid keeps where things
are, so a right-sided finding does not retrieve a left-sided one), compared by cosine.
"""

from __future__ import annotations

import math

import numpy as np


def code_histograms(codes: np.ndarray, codebook: int, regions: int = 2) -> np.ndarray:
    """``(n, regions**2 * codebook)`` counts of each code in each cell of a ``regions x regions`` split."""
    n, length = codes.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"codes of length {length} are not a square grid")
    if not 1 <= regions <= side:
        raise ValueError(f"regions must be between 1 and {side}, got {regions}")
    grid = codes.reshape(n, side, side)
    row = np.minimum(np.arange(side) * regions // side, regions - 1)
    cell = (row[:, None] * regions + row[None, :]).reshape(-1)  # region of each grid position
    flat = cell[None, :] * codebook + grid.reshape(n, -1)
    out = np.zeros((n, regions * regions * codebook), dtype=np.float32)
    np.add.at(out, (np.repeat(np.arange(n), length), flat.reshape(-1)), 1.0)
    return out


def _unit_tfidf(hist: np.ndarray, idf: np.ndarray) -> np.ndarray:
    v = hist * idf
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def nearest_report(train_codes: np.ndarray, train_reports: list[str], query_codes: np.ndarray, codebook: int,
                   regions: int = 2, chunk: int = 256) -> tuple[list[str], np.ndarray, np.ndarray]:
    """For each query, the report of the most similar training image: (reports, their indices, similarities)."""
    if len(train_codes) != len(train_reports):
        raise ValueError(f"{len(train_codes)} training code grids for {len(train_reports)} reports")
    if len(train_codes) == 0:
        raise ValueError("no training studies to retrieve from")
    train = code_histograms(train_codes, codebook, regions)
    df = (train > 0).sum(axis=0)
    idf = np.log((1 + len(train)) / (1 + df)).astype(np.float32) + 1.0  # smoothed idf, as scikit-learn's
    train = _unit_tfidf(train, idf)
    best = np.zeros(len(query_codes), dtype=np.int64)
    sim = np.zeros(len(query_codes), dtype=np.float32)
    for s in range(0, len(query_codes), chunk):
        q = _unit_tfidf(code_histograms(query_codes[s:s + chunk], codebook, regions), idf)
        scores = q @ train.T
        best[s:s + chunk] = scores.argmax(axis=1)
        sim[s:s + chunk] = scores.max(axis=1)
    return [train_reports[i] for i in best], best, sim


def nearest_report_dataset(path, split: str = "test", train_split: str = "train", regions: int = 2,
                           limit: int | None = None) -> list[dict]:
    """Rows ``{id, report, neighbour, similarity}`` for a dataset encoded by ``llm-cxr vqgan encode``."""
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.errors import DatasetError

    def grids(ds) -> np.ndarray:
        if "codes" not in ds.column_names:
            raise DatasetError(f"{path} has no 'codes' column: encode it first (`llm-cxr vqgan encode`)")
        return np.asarray(ds.with_format("numpy")[:]["codes"]).astype(np.int64)

    train = load_dataset(path, split=train_split).select_columns(["id", "report", "codes"])
    query = load_dataset(path, split=split).select_columns(["id", "report", "codes"])
    if limit:
        query = query.select(range(min(limit, len(query))))
    tc, qc = grids(train), grids(query)
    codebook = int(max(tc.max(), qc.max())) + 1
    reports, idx, sim = nearest_report(tc, list(train["report"]), qc, codebook, regions)
    train_ids = list(train["id"])
    return [{"id": i, "report": r, "neighbour": train_ids[j], "similarity": round(float(s), 4)}
            for i, r, j, s in zip(query["id"], reports, idx, sim)]
