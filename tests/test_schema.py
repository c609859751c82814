import json

import numpy as np
import pytest
from PIL import Image

from llm_cxr.data import schema
from llm_cxr.data.dataset import load_dataset, write_dataset
from llm_cxr.data.reports import format_report, parse_sections
from llm_cxr.data.schema import Finding, labels_from_findings
from llm_cxr.errors import DatasetError, NothingUsableError


def test_labels_from_findings_implies_parent_classes_and_no_finding():
    labels = labels_from_findings([Finding("nodule", "right", "right upper lobe", size_mm=12.0),
                                   Finding("chest_tube", "left")])
    assert labels["nodule"] == 1 and labels["lung_lesion"] == 1
    assert labels["support_devices"] == 1 and labels["chest_tube"] == 1
    assert labels["no_finding"] == 0 and labels["pneumothorax"] == 0
    assert set(labels) == set(schema.LABEL_NAMES)
    # Devices alone leave "no finding" positive, as in CheXpert.
    assert labels_from_findings([Finding("pacemaker", "left")])["no_finding"] == 1
    assert labels_from_findings([])["no_finding"] == 1


def test_finding_roundtrip_and_validation():
    fs = [Finding("pleural_effusion", "bilateral", severity="small"), Finding("cardiomegaly", extra={"ctr": 0.6})]
    assert schema.findings_from_json(schema.findings_to_json(fs)) == fs
    with pytest.raises(ValueError, match="laterality"):
        Finding("pneumothorax", "up")
    with pytest.raises(DatasetError, match="unknown keys"):
        Finding.from_dict({"name": "edema", "colour": "red"})
    with pytest.raises(DatasetError, match="unknown finding name"):
        labels_from_findings([Finding("dragon")])


def test_assign_split_is_deterministic_and_roughly_proportional():
    splits = [schema.assign_split(f"p{i}", seed=3) for i in range(5000)]
    assert splits == [schema.assign_split(f"p{i}", seed=3) for i in range(5000)]
    frac = {s: splits.count(s) / len(splits) for s in schema.SPLITS}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.02
    assert splits != [schema.assign_split(f"p{i}", seed=4) for i in range(5000)]
    with pytest.raises(ValueError):
        schema.assign_split("p", fractions=(0.5, 0.5, 0.5))


def test_report_sections_roundtrip_and_real_headers():
    text = format_report("Heart size is normal.  No effusion.", "No acute disease.")
    assert text == "FINDINGS: Heart size is normal. No effusion.\nIMPRESSION: No acute disease."
    s = parse_sections(text)
    assert s.findings == "Heart size is normal. No effusion." and s.impression == "No acute disease."
    mimic_like = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
                  " INDICATION:  ___ with cough\n\n COMPARISON:  None.\n\n FINDINGS: \n\n Lungs are clear.\n"
                  " No pleural effusion.\n\n IMPRESSION: \n\n No acute process.\n")
    s = parse_sections(mimic_like)
    assert s.findings == "Lungs are clear. No pleural effusion."
    assert s.impression == "No acute process." and s.comparison == "None."
    assert "cough" in s.indication
    assert parse_sections("just some text").other == "just some text"
    assert parse_sections("").empty


def _row(i, split="train"):
    img = Image.fromarray(np.full((8, 8), i * 10, np.uint8))
    return {"id": f"r{i}", "patient_id": f"p{i}", "split": split, "image": img, "report": "FINDINGS: x",
            "findings": "[]", "labels": schema.empty_labels(), "masks": [], "source": "test", "meta": "{}"}


def test_write_dataset_counts_bad_items_and_keeps_good_ones(tmp_path):
    def rows(bad):
        for i in range(5):
            if i == 2:
                bad.add(f"img{i}.png", "truncated file")
                continue
            yield _row(i, "test" if i == 4 else "train")

    summary = write_dataset(rows, tmp_path / "ds")
    assert summary.n_rows == 4 and summary.n_bad == 1 and summary.splits == {"test": 1, "train": 3}
    ds = load_dataset(tmp_path / "ds")
    assert ds["id"] == ["r0", "r1", "r3", "r4"]
    assert ds[0]["image"].mode == "L"
    bad = [json.loads(line) for line in (tmp_path / "ds" / "bad_items.jsonl").read_text().splitlines()]
    assert bad == [{"item": "img2.png", "problem": "truncated file"}]
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["n_bad"] == 1
    assert len(load_dataset(tmp_path / "ds", split="test")) == 1
    # Nothing left of the temporary build folder.
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_write_dataset_with_nothing_usable_raises_and_keeps_previous(tmp_path):
    write_dataset(lambda bad: iter([_row(0)]), tmp_path / "ds")

    def rows(bad):
        bad.add("a.png", "not an image")
        yield from ()

    with pytest.raises(NothingUsableError, match="a.png: not an image"):
        write_dataset(rows, tmp_path / "ds")
    assert len(load_dataset(tmp_path / "ds")) == 1  # the earlier dataset is untouched


def test_load_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match="not a saved dataset"):
        load_dataset(tmp_path / "junk")


def _resumable(n, fail_at=None, bad_at=(), seen=None):
    """A row generator over n source items that supports resuming, and fails at item ``fail_at``."""
    def rows(job):
        for i in range(job.start, n):
            if i == fail_at:
                raise KeyboardInterrupt
            if seen is not None:
                seen.append(i)
            job.position = i + 1
            if i in bad_at:
                job.add(f"img{i}.png", "truncated file")
                continue
            yield _row(i, "test" if i % 4 == 0 else "train")
    return rows


def test_write_dataset_resumes_after_its_last_chunk_and_equals_a_straight_run(tmp_path):
    straight = write_dataset(_resumable(10, bad_at=(2, 7)), tmp_path / "ref", info={"a": 1}, chunk_rows=3)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(_resumable(10, fail_at=8, bad_at=(2, 7)), tmp_path / "ds", info={"a": 1}, chunk_rows=3)
    assert not (tmp_path / "ds").exists() and (tmp_path / ".ds.partial").is_dir()
    seen = []
    resumed = write_dataset(_resumable(10, bad_at=(2, 7), seen=seen), tmp_path / "ds", info={"a": 1}, chunk_rows=3)
    assert seen == [7, 8, 9]  # two chunks (items 0-6, bad item 2 included) were kept
    assert load_dataset(tmp_path / "ds").data.table.equals(load_dataset(tmp_path / "ref").data.table)
    assert (resumed.n_rows, resumed.n_bad, resumed.splits) == (straight.n_rows, straight.n_bad, straight.splits)
    assert [b.item for b in resumed.bad_items] == ["img2.png", "img7.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ref"]


def _interrupted_without_position(job):
    """A generator that does not say where it is: its chunks cannot be resumed from."""
    for i in range(10):
        if i == 8:
            raise KeyboardInterrupt
        yield _row(i)


@pytest.mark.parametrize("change", ["info", "key", "no position"])
def test_write_dataset_starts_over_when_it_cannot_resume(tmp_path, change):
    first = _interrupted_without_position if change == "no position" else _resumable(10, fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(first, tmp_path / "ds", info={"a": 1}, key=1, chunk_rows=3)
    assert json.loads((tmp_path / ".ds.partial" / "manifest.json").read_text())["chunks"]
    seen = []
    info, key = ({"a": 2}, 1) if change == "info" else ({"a": 1}, 2 if change == "key" else 1)
    summary = write_dataset(_resumable(10, seen=seen), tmp_path / "ds", info=info, key=key, chunk_rows=3)
    assert seen == list(range(10)) and summary.n_rows == 10
    assert load_dataset(tmp_path / "ds")["id"] == [f"r{i}" for i in range(10)]


def test_write_dataset_starts_over_when_a_kept_chunk_is_gone(tmp_path):
    import shutil

    with pytest.raises(KeyboardInterrupt):
        write_dataset(_resumable(10, fail_at=8), tmp_path / "ds", chunk_rows=3)
    shutil.rmtree(tmp_path / ".ds.partial" / "chunk-00000")  # removed by hand, or lost
    seen = []
    summary = write_dataset(_resumable(10, seen=seen), tmp_path / "ds", chunk_rows=3)
    assert seen == list(range(10)) and summary.n_rows == 10
