"""Writing and reading llm-cxr datasets on disk.

Writers stream rows (``datasets.Dataset.from_generator``), so memory stays flat however
many images there are. Bad items never stop a job: they are counted and listed in
``bad_items.jsonl`` and ``summary.json`` inside the dataset folder, and the job fails only
when nothing usable is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from llm_cxr.data.schema import REQUIRED_COLUMNS, dataset_features
from llm_cxr.errors import DatasetError, NothingUsableError
from llm_cxr.files import write_atomic

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
BAD_ITEMS_FILE = "bad_items.jsonl"
_MANIFEST = "manifest.json"
# a chunk is written (and the job can resume after it) every CHUNK_ROWS rows or CHUNK_BYTES of images
CHUNK_ROWS, CHUNK_BYTES = 512, 64 << 20


@dataclass
class BadItem:
    item: str  # the file or row that was bad
    problem: str  # what was wrong, in words a user can act on

    def to_dict(self) -> dict[str, str]:
        return {"item": self.item, "problem": self.problem}


@dataclass
class WriteSummary:
    out_dir: str
    n_rows: int = 0
    n_bad: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    bad_items: list[BadItem] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "n_rows": self.n_rows,
            "n_bad": self.n_bad,
            "splits": self.splits,
            "bad_items_preview": [b.to_dict() for b in self.bad_items[:20]],
            **self.info,
        }


class BadItemLog:
    """Collects bad items during a job; passed to row generators."""

    def __init__(self, items: list[BadItem] | None = None) -> None:
        self.items: list[BadItem] = list(items or [])

    def add(self, item: str | Path, problem: str) -> None:
        self.items.append(BadItem(str(item), problem))
        log.warning("skipped %s: %s", item, problem)

    def __len__(self) -> int:
        return len(self.items)


class WriteJob(BadItemLog):
    """What :func:`write_dataset` passes to a row generator: the bad-item log, and where to resume.

    A generator that walks a list of source items can make the job resumable: start at item
    ``start`` (the items before it are already in the dataset, or were bad), count its rows from
    ``rows_done`` (for a row limit), treat ``ids_done`` as written, and set ``position`` to
    ``i + 1`` once item ``i`` is dealt with, *before* yielding its row. A generator that never
    sets ``position`` still works; its job just starts over after an interruption.
    """

    def __init__(self, items: list[BadItem] | None = None, start: int = 0, rows_done: int = 0,
                 ids_done: set[str] | None = None) -> None:
        super().__init__(items)
        self.start, self.rows_done = start, rows_done
        self.ids_done: set[str] = ids_done or set()
        self.position: int | None = None


def write_dataset(
    rows: Callable[[WriteJob], Iterator[dict[str, Any]]],
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
    overwrite: bool = True,
    key: Any = None,
    chunk_rows: int | None = None,
) -> WriteSummary:
    """Stream ``rows(job)`` into an Arrow dataset at ``out_dir``, resumably.

    ``rows`` is a generator function taking a :class:`WriteJob`; it yields complete rows in
    the schema and records what it had to skip. Rows are written in chunks to a work folder
    next to ``out_dir`` (``.NAME.partial``), each chunk with the generator's position, so a
    job killed at any point resumes, when run again with the same ``info`` and ``key``, after
    its last chunk (generators that support it, see :class:`WriteJob`). The dataset is moved
    into place only when complete: an interrupted job never leaves a half-written dataset.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = _Partial(out_dir.parent / f".{out_dir.name}.partial", {"info": info or {}, "key": key})
    job = work.resume()
    chunk_rows = chunk_rows or CHUNK_ROWS
    buffer: list[dict[str, Any]] = []
    size = 0
    try:
        for row in rows(job):
            buffer.append(row)
            size += _row_bytes(row)
            if len(buffer) >= chunk_rows or size >= CHUNK_BYTES:
                work.flush(buffer, job)
                buffer, size = [], 0
        work.flush(buffer, job)
    except BaseException:
        if work.chunks:
            log.warning("kept %d row(s) already written in %s: run the same command again to resume",
                        work.n_rows, work.path)
        raise
    summary = WriteSummary(str(out_dir), work.n_rows, len(job), dict(sorted(work.counts.items())), job.items,
                           info or {})
    if work.n_rows == 0:
        work.remove()
        if not job.items:
            raise NothingUsableError(f"no item to write to {out_dir}: the source has no rows (only a header, "
                                     f"or every row filtered out)")
        raise NothingUsableError(
            f"no usable item for {out_dir}: {len(job)} bad item(s); first problems: "
            + "; ".join(f"{b.item}: {b.problem}" for b in job.items[:5])
        )
    work.finish(out_dir, summary)
    log.info("wrote %d rows to %s (%d bad items skipped)", work.n_rows, out_dir, len(job))
    return summary


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()


def _row_bytes(row: dict[str, Any]) -> int:
    image = row.get("image")
    return len(image.get("bytes") or b"") if isinstance(image, dict) else 0


class _Partial:
    """The work folder of one :func:`write_dataset` call: numbered chunks and a manifest.

    The manifest is replaced atomically after each chunk folder is renamed into place, so
    it never names a chunk that is not complete; a chunk it does not name is a leftover of
    a killed job and is deleted.
    """

    def __init__(self, path: Path, job: dict[str, Any]) -> None:
        self.path, self.job = path, json.loads(json.dumps(job, default=str, sort_keys=True))
        self.chunks: list[dict[str, Any]] = []  # {"name", "rows", "position"} per chunk, in order
        self.counts: dict[str, int] = {}
        self.bad: list[dict[str, str]] = []

    @property
    def n_rows(self) -> int:
        return sum(c["rows"] for c in self.chunks)

    def resume(self) -> WriteJob:
        import datasets

        manifest = self._read_manifest()
        usable = (manifest is not None and manifest.get("job") == self.job and manifest.get("chunks")
                  and all(c.get("position") is not None for c in manifest["chunks"]))
        ids: set[str] = set()
        if usable:
            try:  # the ids already written (a chunk deleted or damaged by hand: start over)
                for c in manifest["chunks"]:
                    ids.update(datasets.load_from_disk(str(self.path / c["name"]))["id"])
            except (OSError, ValueError) as e:
                log.warning("%s: a chunk cannot be read (%s); starting over", self.path, e)
                usable = False
        if not usable:
            if manifest is not None:
                log.info("%s is from another job (other source or options) or cannot be resumed; starting over",
                         self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self._write_manifest()
            return WriteJob()
        self.chunks, self.counts, self.bad = manifest["chunks"], manifest["counts"], manifest["bad"]
        named = {c["name"] for c in self.chunks}
        for leftover in self.path.iterdir():
            if leftover.name != _MANIFEST and leftover.name not in named:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        start = self.chunks[-1]["position"]
        log.info("resuming %s: %d row(s) and %d bad item(s) already done, from source item %d (delete %s to "
                 "start over)", self.path.name, self.n_rows, len(self.bad), start, self.path)
        return WriteJob([BadItem(**b) for b in self.bad], start=start, rows_done=self.n_rows, ids_done=ids)

    def flush(self, buffer: list[dict[str, Any]], job: WriteJob) -> None:
        """Write ``buffer`` as the next chunk and record the generator's position and bad items."""
        import datasets
        import pyarrow

        if not buffer:
            return
        name = f"chunk-{len(self.chunks):05d}"
        tmp = self.path / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _no_progress_bars():  # one bar per chunk would bury the job's own
                datasets.Dataset.from_list(buffer, features=dataset_features()).save_to_disk(str(tmp))
        except (ValueError, TypeError, KeyError, pyarrow.ArrowException) as e:
            raise DatasetError(f"could not write dataset rows to {self.path}: {type(e).__name__}: {e}") from e
        os.replace(tmp, self.path / name)
        for row in buffer:
            self.counts[row["split"]] = self.counts.get(row["split"], 0) + 1
        self.chunks.append({"name": name, "rows": len(buffer), "position": job.position})
        self.bad = [b.to_dict() for b in job.items]
        self._write_manifest()

    def finish(self, out_dir: Path, summary: WriteSummary) -> None:
        """Join the chunks into the dataset at ``out_dir`` (replacing what was there) and remove the work folder."""
        import datasets

        parts = [datasets.load_from_disk(str(self.path / c["name"])) for c in self.chunks]
        staged = self.path / "dataset"
        shutil.rmtree(staged, ignore_errors=True)
        (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)).save_to_disk(str(staged))
        del parts
        _write_reports(staged, summary)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / _MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def _write_manifest(self) -> None:
        write_atomic(self.path / _MANIFEST,
                     json.dumps({"job": self.job, "chunks": self.chunks, "counts": self.counts, "bad": self.bad}))


def _write_reports(folder: Path, summary: WriteSummary) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    with open(folder / BAD_ITEMS_FILE, "w") as f:
        for b in summary.bad_items:
            f.write(json.dumps(b.to_dict()) + "\n")


def load_dataset(path: str | Path, split: str | None = None):
    """Load an llm-cxr dataset from disk, checking that it has the schema's columns."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset folder {path} does not exist (create one with `llm-cxr data synth`)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder that is not a dataset
        raise DatasetError(f"{path} is not a saved dataset ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(f"{path} holds a DatasetDict; llm-cxr datasets keep splits in a 'split' column")
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DatasetError(f"dataset {path} lacks columns {missing}; found {ds.column_names}")
    if split is not None:
        # in memory: an index list, not a cache file written into the dataset's folder (which may be read-only)
        ds = ds.filter(lambda s: s == split, input_columns="split", keep_in_memory=True)
        if len(ds) == 0:
            raise DatasetError(f"dataset {path} has no rows in split {split!r}")
    return ds
