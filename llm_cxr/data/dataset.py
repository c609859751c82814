"""Writing and reading llm-cxr datasets on disk.

Writers stream rows (``datasets.Dataset.from_generator``), so memory stays flat however
many images there are. Bad items never stop a job: they are counted and listed in
``bad_items.jsonl`` and ``summary.json`` inside the dataset folder, and the job fails only
when nothing usable is left.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from llm_cxr.data.schema import REQUIRED_COLUMNS, dataset_features
from llm_cxr.errors import DatasetError, NothingUsableError

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
BAD_ITEMS_FILE = "bad_items.jsonl"


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

    def __init__(self) -> None:
        self.items: list[BadItem] = []

    def add(self, item: str | Path, problem: str) -> None:
        self.items.append(BadItem(str(item), problem))
        log.warning("skipped %s: %s", item, problem)

    def __len__(self) -> int:
        return len(self.items)


def write_dataset(
    rows: Callable[[BadItemLog], Iterator[dict[str, Any]]],
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> WriteSummary:
    """Stream ``rows(bad_log)`` into an Arrow dataset at ``out_dir``.

    ``rows`` is a generator function taking a :class:`BadItemLog`; it yields complete rows in
    the schema and records what it had to skip. The dataset is built in a temporary folder
    next to ``out_dir`` and moved into place only when complete, so an interrupted job
    never leaves a half-written dataset behind.
    """
    import datasets

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    bad = BadItemLog()
    counts: dict[str, int] = {}

    def gen() -> Iterator[dict[str, Any]]:
        for row in rows(bad):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
            yield row

    # one temporary folder per output, emptied first: a killed job's leftovers go (never reused: the counts and the
    # bad items come from running the generator), and the folder goes on success and on error alike
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            ds = datasets.Dataset.from_generator(
                gen, features=dataset_features(), cache_dir=str(Path(tmp) / "cache")
            )
            n = len(ds)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
            # datasets refuses an empty generator (every item was bad): that is ours to report.
            if counts:
                raise DatasetError(f"could not write dataset {out_dir}: {e.__cause__ or e}") from e
            n = 0
        summary = WriteSummary(str(out_dir), n, len(bad), dict(sorted(counts.items())), bad.items, info or {})
        if n == 0:
            _write_reports(Path(tmp) / "report", summary)
            if not bad.items:
                raise NothingUsableError(f"no item to write to {out_dir}: the source has no rows (only a header, "
                                         f"or every row filtered out)")
            raise NothingUsableError(
                f"no usable item for {out_dir}: {len(bad)} bad item(s); first problems: "
                + "; ".join(f"{b.item}: {b.problem}" for b in bad.items[:5])
            )
        staged = Path(tmp) / "dataset"
        ds.save_to_disk(str(staged))
        del ds
        _write_reports(staged, summary)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d rows to %s (%d bad items skipped)", n, out_dir, len(bad))
    return summary


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
