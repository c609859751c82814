"""Importers: each layout becomes schema rows; bad items are skipped and listed, never fatal."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from llm_cxr.cli import main
from llm_cxr.data.dataset import load_dataset
from llm_cxr.data.importers import import_folder, import_iu, import_mimic, import_table
from llm_cxr.data.labeler import dataset_labels
from llm_cxr.data.schema import LABEL_NAMES, REQUIRED_COLUMNS, Finding, empty_labels
from llm_cxr.errors import ConfigError, DatasetError, NothingUsableError

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "realcxr-dev"
SIZE = 16


# ---- file makers -----------------------------------------------------------------------------

def write_image(path: Path, mode: str = "L", size: tuple[int, int] = (24, 20), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.tile(np.linspace(0, 255, size[0]), (size[1], 1)).astype(np.uint8)
    Image.fromarray(a, "L").convert(mode).save(path, format=fmt)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


def write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def write_dicom(path: Path, photometric: str = "MONOCHROME2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pixels = np.tile(np.linspace(0, 4095, 24), (20, 1)).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")
    with f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def bad_items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bad_items.jsonl").read_text().splitlines()]


def check_schema(ds, n: int) -> None:
    assert len(ds) == n
    assert set(REQUIRED_COLUMNS) <= set(ds.column_names)
    for row in ds:
        assert row["image"].mode == "L" and row["image"].size == (SIZE, SIZE)
        assert row["split"] in ("train", "val", "test")
        assert row["masks"] == []
        assert set(row["labels"]) == set(LABEL_NAMES)
        json.loads(row["meta"])
        json.loads(row["findings"])


def one_split_per_patient(ds) -> dict[str, str]:
    seen: dict[str, str] = {}
    for pid, split in zip(ds["patient_id"], ds["split"]):
        assert seen.setdefault(pid, split) == split, f"patient {pid} is in two splits"
    return seen


def fake_labeler(report: str) -> tuple[dict[str, int], list[Finding]]:
    """Reads one word, so tests can tell where each label came from."""
    labels = empty_labels()
    findings = []
    if "nodule" in report:
        labels.update(nodule=1, lung_lesion=1)
        findings.append(Finding("nodule", laterality="left"))
    labels["cardiomegaly"] = 0
    return labels, findings


# ---- MIMIC-CXR-JPG -----------------------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old man with cough.

 COMPARISON:  None.

 FINDINGS:
 Heart size is mildly enlarged. A small left nodule is seen.

 IMPRESSION:
 Mild cardiomegaly.
"""


@pytest.fixture
def mimic(tmp_path) -> tuple[Path, Path]:
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    # (subject, study, dicom, view, image kind, report kind)
    images = [
        ("10000001", "50000001", "d1", "PA", "ok", "ok"),
        ("10000001", "50000001", "d2", "LATERAL", "ok", "ok"),
        ("10000002", "50000002", "d3", "AP", "ok", "nosections"),
        ("11000003", "50000003", "d4", "PA", "corrupt", "ok"),
        ("11000004", "50000004", "d5", "PA", "ok", "ok"),
        ("11000004", "50000004", "d6", "AP", "ok", "ok"),
        ("12000005", "50000005", "d7", "PA", "ok", "missing"),
    ]
    for subj, study, dicom, _, kind, rep in images:
        study_dir = Path("files") / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        img = root / study_dir / f"{dicom}.jpg"
        write_corrupt(img) if kind == "corrupt" else write_image(img, "RGB", fmt="JPEG")
        txt = reports / study_dir.with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        if rep == "ok":
            txt.write_text(MIMIC_REPORT)
        elif rep == "nosections":
            txt.write_text("FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: fever\n")
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
               "Rows", "Columns"],
              [[d, s, st, "CHEST (PA AND LAT)", v, 20, 24] for s, st, d, v, _, _ in images], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [["d1", "50000001", "10000001", "test"], ["d5", "50000004", "11000004", "validate"],
               ["d6", "50000004", "11000004", "validate"]], gz=True)
    cols = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]
    values = {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": "0.0"}
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *cols],
              [["10000001", "50000001", *[values.get(c, "") for c in cols]]], gz=True)
    return root, reports


def test_mimic_rows_splits_and_bad_items(mimic, tmp_path):
    root, reports = mimic
    out = tmp_path / "ds"
    summary = import_mimic(root, reports_root=reports, out=out, size=SIZE, label=False, progress=False)
    assert summary.n_rows == 3 and summary.n_bad == 3
    assert summary.info["n_other_views"] == 1  # the lateral view is left out, not a bad item
    ds = load_dataset(out)
    check_schema(ds, 3)
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"d1", "d5", "d6"}
    assert rows["d1"]["split"] == "test" and rows["d5"]["split"] == rows["d6"]["split"] == "val"
    assert rows["d5"]["patient_id"] == "11000004" and rows["d1"]["source"] == "mimic-cxr-jpg"
    assert rows["d1"]["report"] == (
        "FINDINGS: Heart size is mildly enlarged. A small left nodule is seen.\nIMPRESSION: Mild cardiomegaly."
    )
    meta = json.loads(rows["d6"]["meta"])
    assert meta["view"] == "AP" and meta["original_path"] == "files/p11/p11000004/s50000004/d6.jpg"
    assert meta["indication"] == "___ year old man with cough."
    # Official CheXpert labels where given (1.0 / -1.0 / blank), empty labels elsewhere.
    assert rows["d1"]["labels"]["cardiomegaly"] == 1 and rows["d1"]["labels"]["edema"] == -1
    assert rows["d1"]["labels"]["pneumothorax"] == 0 and rows["d5"]["labels"] == empty_labels()
    problems = {Path(b["item"]).name: b["problem"] for b in bad_items(out)}
    assert set(problems) == {"d3.jpg", "d4.jpg", "d7.jpg"}
    assert "no FINDINGS or IMPRESSION section" in problems["d3.jpg"]
    assert "truncated or corrupt" in problems["d4.jpg"] or "not an image" in problems["d4.jpg"]
    assert "s50000005.txt does not exist" in problems["d7.jpg"]
    assert json.loads((out / "summary.json").read_text())["n_bad"] == 3


def test_mimic_labeler_and_chexpert_combine(mimic, tmp_path):
    root, reports = mimic
    out = tmp_path / "ds"
    import_mimic(root, reports_root=reports, views=("PA",), out=out, size=SIZE, label=fake_labeler,
                 progress=False)
    rows = {r["id"]: r for r in load_dataset(out)}
    assert set(rows) == {"d1", "d5"}  # AP views d3/d6 are not asked for
    # CheXpert-14 from the official file, the finer names (nodule) from the labeler.
    assert rows["d1"]["labels"]["cardiomegaly"] == 1 and rows["d1"]["labels"]["nodule"] == 1
    assert rows["d5"]["labels"]["cardiomegaly"] == 0 and rows["d5"]["labels"]["lung_lesion"] == 1
    assert json.loads(rows["d5"]["findings"]) == [{"name": "nodule", "laterality": "left"}]


def test_mimic_without_split_file_splits_by_patient_and_limit(mimic, tmp_path):
    root, reports = mimic
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    summary = import_mimic(root, reports_root=reports, out=tmp_path / "ds", size=SIZE, label=False,
                           progress=False)
    assert summary.info["split_source"].startswith("per-patient")
    one_split_per_patient(load_dataset(tmp_path / "ds"))
    limited = import_mimic(root, reports_root=reports, out=tmp_path / "one", size=SIZE, limit=1, label=False,
                           progress=False)
    assert limited.n_rows == 1


def test_mimic_missing_metadata_and_columns(mimic, tmp_path):
    root, reports = mimic
    with pytest.raises(DatasetError, match="does not exist"):
        import_mimic(tmp_path / "nowhere", out=tmp_path / "ds", label=False)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id"], [["a", "1", "2"]])
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"metadata\.csv has no column\(s\) \['ViewPosition'\]; columns found"):
        import_mimic(root, reports_root=reports, out=tmp_path / "ds", label=False)
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(DatasetError, match="no mimic-cxr-2.0.0-metadata.csv"):
        import_mimic(root, reports_root=reports, out=tmp_path / "ds", label=False)


# ---- IU X-ray (Kaggle) ---------------------------------------------------------------------------

@pytest.fixture
def iu(tmp_path) -> Path:
    root = tmp_path / "iu"
    images = root / "images" / "images_normalized"
    write_csv(root / "indiana_reports.csv",
              ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"],
              [[1, "normal", "normal", "Xray Chest PA and Lateral", "cough", "None.", "The lungs are clear.",
                "No acute disease."],
               [2, "normal", "normal", "Xray Chest PA", "", "", "", ""],
               [3, "Nodule", "Nodule", "Xray Chest PA", "", "", "", "Left nodule."],
               [5, "normal", "normal", "Xray Chest PA", "", "", "Heart normal.", ""]])
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"],
              [[1, "1_IM-0001-4001.dcm.png", "Frontal"], [1, "1_IM-0001-3001.dcm.png", "Lateral"],
               [2, "2_IM-0652-1001.dcm.png", "Frontal"], [3, "3_IM-1384-1001.dcm.png", "Frontal"],
               [4, "4_IM-2050-1001.dcm.png", "Frontal"], [5, "5_IM-2117-1003002.dcm.png", "Frontal"]])
    for name in ("1_IM-0001-4001", "1_IM-0001-3001", "2_IM-0652-1001", "4_IM-2050-1001"):
        write_image(images / f"{name}.dcm.png", "RGB")
    write_truncated_jpeg(images / "5_IM-2117-1003002.dcm.png")
    return root


def test_iu_frontal_only(iu, tmp_path):
    out = tmp_path / "ds"
    summary = import_iu(iu, out=out, size=SIZE, label=False, progress=False)
    ds = load_dataset(out)
    check_schema(ds, 1)
    row = ds[0]
    assert row["id"] == "1_IM-0001-4001" and row["patient_id"] == "1" and row["source"] == "iu-xray"
    assert row["report"] == "FINDINGS: The lungs are clear.\nIMPRESSION: No acute disease."
    meta = json.loads(row["meta"])
    assert meta["view"] == "Frontal" and meta["problems"] == "normal" and meta["comparison"] == "None."
    problems = {Path(b["item"]).name: b["problem"] for b in bad_items(out)}
    assert set(problems) == {"2_IM-0652-1001.dcm.png", "3_IM-1384-1001.dcm.png", "4_IM-2050-1001.dcm.png",
                             "5_IM-2117-1003002.dcm.png"}
    assert "empty findings and impression" in problems["2_IM-0652-1001.dcm.png"]
    assert "does not exist" in problems["3_IM-1384-1001.dcm.png"]
    assert "no report with uid 4" in problems["4_IM-2050-1001.dcm.png"]
    assert "truncated or corrupt" in problems["5_IM-2117-1003002.dcm.png"]
    assert summary.info["n_other_views"] == 1


def test_iu_all_views_keep_one_patient_in_one_split(iu, tmp_path):
    out = tmp_path / "ds"
    import_iu(iu, frontal_only=False, out=out, size=SIZE, label=False, progress=False, seed=3)
    ds = load_dataset(out)
    assert sorted(ds["id"]) == ["1_IM-0001-3001", "1_IM-0001-4001"]
    assert len(set(ds["split"])) == 1
    (iu / "images").rename(iu / "pictures")
    with pytest.raises(DatasetError, match="neither images/images_normalized/ nor images/"):
        import_iu(iu, out=out, label=False)
    assert import_iu(iu, images_dir=iu / "pictures" / "images_normalized", out=out, size=SIZE, label=False,
                     progress=False).n_rows == 1


# ---- tables ---------------------------------------------------------------------------------------

def make_table_images(root: Path) -> None:
    write_image(root / "img" / "a.png", "RGB")
    write_image(root / "img" / "b.jpg", "L", fmt="JPEG")
    write_image(root / "img" / "c.png", "RGBA")
    write_dicom(root / "img" / "d.dcm")
    write_image(root / "img" / "e.png")
    write_corrupt(root / "img" / "bad.png")


TABLE_ROWS = [
    # image, report, patient
    ["img/a.png", "Free text: cough. Patchy right lower zone opacity.", "p1"],
    ["img/b.jpg", "INDICATION: fever\nFINDINGS: Clear lungs.\nIMPRESSION: Normal.", "p1"],
    ["img/c.png", "IMPRESSION: Small nodule.", "p2"],
    ["img/d.dcm", "no headers here, only notes", "p3"],
    ["img/e.png", "INDICATION: pain\nCOMPARISON: none", "p4"],
    ["img/missing.png", "Clear.", "p5"],
    ["img/bad.png", "Clear.", "p6"],
    ["img/a.png", "", "p7"],
]


def test_table_csv(tmp_path):
    make_table_images(tmp_path)
    table = write_csv(tmp_path / "t.csv", ["path", "text", "pid", "view"], [r + ["PA"] for r in TABLE_ROWS])
    out = tmp_path / "ds"
    summary = import_table(table, image_column="path", report_column="text", patient_column="pid", out=out,
                           size=SIZE, label=False, progress=False)
    ds = load_dataset(out)
    check_schema(ds, 4)
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"img/a", "img/b", "img/c", "img/d"}
    # No recognised header: the whole text is the findings. With headers: the sections.
    assert rows["img/a"]["report"] == "FINDINGS: Free text: cough. Patchy right lower zone opacity."
    assert rows["img/b"]["report"] == "FINDINGS: Clear lungs.\nIMPRESSION: Normal."
    assert rows["img/c"]["report"] == "IMPRESSION: Small nodule."
    assert rows["img/a"]["split"] == rows["img/b"]["split"]  # one patient, one split
    assert json.loads(rows["img/d"]["meta"])["view"] == "PA"
    assert np.asarray(rows["img/d"]["image"])[:, -4:].mean() > np.asarray(rows["img/d"]["image"])[:, :4].mean()
    problems = [(b["item"], b["problem"]) for b in bad_items(out)]
    assert summary.n_bad == 4 and len(problems) == 4
    text = "\n".join(f"{i} {p}" for i, p in problems)
    assert "e.png" in text and "headers but no FINDINGS or IMPRESSION" in text
    assert "missing.png" in text and "does not exist" in text
    assert "bad.png" in text and "row 8: empty report" in text


def test_table_jsonl_and_default_patients(tmp_path):
    make_table_images(tmp_path)
    lines = [json.dumps({"image": r[0], "report": r[1]}) for r in TABLE_ROWS[:4]]
    lines.insert(2, "{not json")
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    summary = import_table(tmp_path / "t.jsonl", out=out, size=SIZE, label=False, progress=False)
    ds = load_dataset(out)
    check_schema(ds, 4)
    assert sorted(ds["patient_id"]) == sorted(ds["id"])  # one patient per row without a patient column
    assert summary.n_bad == 1 and "t.jsonl line 3" in bad_items(out)[0]["item"]


def test_table_missing_columns_is_fatal(tmp_path):
    table = write_csv(tmp_path / "t.csv", ["file", "report"], [["a.png", "x"]])
    with pytest.raises(DatasetError, match=r"t\.csv has no column\(s\) \['image'\]; columns found: \['file', "
                                           r"'report'\]"):
        import_table(table, out=tmp_path / "ds", label=False)
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"no column\(s\) \['report'\]"):
        import_table(tmp_path / "t.jsonl", out=tmp_path / "ds", label=False)
    with pytest.raises(DatasetError, match=r"nope\.csv does not exist"):
        import_table(tmp_path / "nope.csv", out=tmp_path / "ds", label=False)
    with pytest.raises(ConfigError, match="size"):
        import_table(table, out=tmp_path / "ds", size=-3, label=False)


def test_custom_labeler_fills_labels(tmp_path):
    make_table_images(tmp_path)
    table = write_csv(tmp_path / "t.csv", ["image", "report"], [["img/a.png", "FINDINGS: left nodule."],
                                                               ["img/b.jpg", "FINDINGS: clear."]])
    import_table(table, out=tmp_path / "ds", size=SIZE, label=fake_labeler, progress=False)
    rows = {r["id"]: r for r in load_dataset(tmp_path / "ds")}
    assert rows["img/a"]["labels"]["nodule"] == 1 and rows["img/b"]["labels"]["nodule"] == 0
    assert json.loads(rows["img/a"]["findings"]) == [{"name": "nodule", "laterality": "left"}]


def test_real_labeler(tmp_path):
    labeler = pytest.importorskip("llm_cxr.data.labeler", reason="the report labeler has not landed yet")
    assert hasattr(labeler, "dataset_labels")
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    table = write_csv(tmp_path / "t.csv", ["image", "report"], [
        ["a.png", "FINDINGS: Large right pleural effusion. IMPRESSION: Right pleural effusion."],
        ["b.png", "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. IMPRESSION: Normal."]])
    import_table(table, out=tmp_path / "ds", size=SIZE, label=dataset_labels, progress=False)
    rows = {r["id"]: r for r in load_dataset(tmp_path / "ds")}
    assert rows["a"]["labels"]["pleural_effusion"] == 1
    assert rows["b"]["labels"]["pleural_effusion"] == 0
    assert any(f["name"] == "pleural_effusion" for f in json.loads(rows["a"]["findings"]))


# ---- folder ----------------------------------------------------------------------------------------

def test_folder(tmp_path):
    src = tmp_path / "xrays"
    write_dicom(src / "a" / "one.dcm", photometric="MONOCHROME1")
    write_dicom(src / "a" / "IM0002")  # DICOM without an extension
    sixteen = np.tile(np.linspace(0, 4095, 24), (20, 1)).astype(np.uint16)
    Image.fromarray(sixteen).save(src / "b16.png")  # mode I;16
    write_image(src / "c" / "rgb.jpg", "RGB", fmt="JPEG")
    write_corrupt(src / "corrupt.png")
    write_truncated_jpeg(src / "c" / "cut.jpg")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "ds"
    summary = import_folder(src, out=out, size=SIZE, progress=False)
    ds = load_dataset(out)
    check_schema(ds, 4)
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"a/one", "a/IM0002", "b16", "c/rgb"}
    assert all(r["report"] == "" and r["findings"] == "[]" and r["labels"] == empty_labels() for r in ds)
    one = np.asarray(rows["a/one"]["image"], float)  # MONOCHROME1: the high raw values on the right are dark
    assert one[:, :4].mean() > one[:, -4:].mean() + 100
    b16 = np.asarray(rows["b16"]["image"])
    # The 12-bit ramp keeps its full range (the crop trims its ends): not clipped at 255, not black.
    assert b16.max() > 220 and b16.min() < 35 and 100 < b16[:, 8].mean() < 160
    assert sorted(Path(b["item"]).name for b in bad_items(out)) == ["corrupt.png", "cut.jpg"]
    assert summary.info["n_ignored_files"] == 1


def test_folder_nothing_usable(tmp_path):
    write_corrupt(tmp_path / "src" / "x.png")
    with pytest.raises(NothingUsableError, match="x.png"):
        import_folder(tmp_path / "src", out=tmp_path / "ds", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingUsableError, match="no image files"):
        import_folder(tmp_path / "empty", out=tmp_path / "ds", progress=False)


# ---- CLI exit codes -------------------------------------------------------------------------------

def test_cli_exit_codes(tmp_path, capsys):
    make_table_images(tmp_path)
    table = write_csv(tmp_path / "t.csv", ["image", "report"], [r[:2] for r in TABLE_ROWS])
    assert main(["-q", "data", "import", "table", str(table), "--out", str(tmp_path / "ds"), "--size", str(SIZE),
                 "--no-label"]) == 0
    assert "bad item(s) skipped" in capsys.readouterr().err
    assert len(load_dataset(tmp_path / "ds")) == 4
    only_bad = write_csv(tmp_path / "bad.csv", ["image", "report"], [["img/bad.png", "Clear."]])
    assert main(["-q", "data", "import", "table", str(only_bad), "--out", str(tmp_path / "ds2"),
                 "--no-label"]) == 3
    assert "bad.png" in capsys.readouterr().err
    assert main(["-q", "data", "import", "mimic", str(tmp_path / "no-such-root"), "--out", str(tmp_path / "d3"),
                 "--no-label"]) == 2
    assert "no-such-root does not exist" in capsys.readouterr().err
    assert main(["-q", "data", "import", "table", str(table), "--image-column", "file", "--out",
                 str(tmp_path / "d4"), "--no-label"]) == 2
    assert "columns found" in capsys.readouterr().err


# ---- real files ------------------------------------------------------------------------------------

@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/realcxr-dev not available")
def test_real_table_all_32_load(tmp_path):
    out = tmp_path / "real"
    summary = import_table(REAL / "metadata.csv", image_column="image_file",
                           patient_column="patient_or_study_id", out=out, size=SIZE, label=False, progress=False)
    assert summary.n_bad == 0, summary.bad_items
    ds = load_dataset(out)
    check_schema(ds, 32)
    one_split_per_patient(ds)
    assert all(r.startswith(("FINDINGS: ", "IMPRESSION: ")) for r in ds["report"])
    assert sum(r.count("IMPRESSION: ") for r in ds["report"]) == 2  # the two IU reports keep their sections


def test_an_unterminated_quote_is_named_not_merged(tmp_path):
    from llm_cxr.data.importers.common import read_csv
    from llm_cxr.errors import DatasetError

    p = tmp_path / "reports.csv"
    p.write_text('id,report\n1,"fine"\n2,"never closed\n3,"third"\n4,fourth\n')
    got = []
    with pytest.raises(DatasetError, match=r"reports\.csv: the row starting on line 3 is malformed"):
        for row in read_csv(p, ["id", "report"]):
            got.append(row)
    assert got == [{"id": "1", "report": "fine"}]  # rows before it were read, none merged
    p.write_text('id,report\n1,"a report, with a comma\nand a line break"\n2,plain\n')  # quoted newlines stay fine
    assert [r["id"] for r in read_csv(p, ["id", "report"])] == ["1", "2"]


@pytest.mark.parametrize("limit", [None, 3])
def test_table_import_interrupted_resumes_with_its_duplicates_and_limit(tmp_path, monkeypatch, limit):
    from llm_cxr.data import dataset
    from llm_cxr.data.importers import generic

    make_table_images(tmp_path)
    rows = [["img/a.png", "Clear.", "p1"], ["img/b.jpg", "Clear.", "p2"], ["img/a.png", "Again.", "p3"],
            ["img/c.png", "Nodule.", "p4"], ["img/e.png", "Clear.", "p5"]]
    table = write_csv(tmp_path / "t.csv", ["image", "report", "pid"], rows)
    monkeypatch.setattr(dataset, "CHUNK_ROWS", 1)  # a chunk per row: the job can resume after any of them
    args = dict(patient_column="pid", size=SIZE, label=False, progress=False, limit=limit)
    ref = import_table(table, out=tmp_path / "ref", **args)
    real, calls, interrupt = generic.load_or_skip, [], [True]

    def interrupted(path, *a):
        calls.append(path.name)
        if path.name == "c.png" and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt  # as a kill would, after a, b and the duplicate a
        return real(path, *a)

    monkeypatch.setattr(generic, "load_or_skip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_table(table, out=tmp_path / "ds", **args)
    calls.clear()
    resumed = import_table(table, out=tmp_path / "ds", **args)
    # a and b were not read again, the duplicate a is still refused, and the limit counts the rows written before
    assert calls == (["c.png", "e.png"] if limit is None else ["c.png"])
    assert load_dataset(tmp_path / "ds").data.table.equals(load_dataset(tmp_path / "ref").data.table)
    assert [b.to_dict() for b in resumed.bad_items] == [b.to_dict() for b in ref.bad_items]
    assert resumed.n_rows == (4 if limit is None else 3) and "duplicate id" in resumed.bad_items[0].problem


def test_table_rows_naming_no_file_and_unforeseen_errors_are_bad_items_not_the_end(tmp_path):
    from llm_cxr.data.dataset import WriteJob
    from llm_cxr.data.importers.common import ImportOptions, stream

    make_table_images(tmp_path)
    rows = [["/", "Clear.", "p1"], ["img/a.png", "Clear.", "p2"], [".", "Clear.", "p3"], ["img/e.png", "Clear.", "p4"]]
    table = write_csv(tmp_path / "t.csv", ["image", "report", "pid"], rows)
    summary = import_table(table, out=tmp_path / "ds", patient_column="pid", size=SIZE, label=False, progress=False)
    assert summary.n_rows == 2 and summary.n_bad == 2
    assert all("is not a file name" in b.problem for b in summary.bad_items)

    def to_row(item):  # a converter with a bug on one item
        if item == 1:
            raise ValueError("boom")
        return {"id": str(item)}

    job = WriteJob()
    got = list(stream([0, 1, 2], to_row, ImportOptions(tmp_path / "x", progress=False), job, "test"))
    assert got == [{"id": "0"}, {"id": "2"}] and job.position == 3
    assert [(b.item, b.problem) for b in job.items] == [("1", "could not be converted (ValueError: boom)")]
