"""The synthetic chest X-ray generator: determinism, masks, anatomy, reports, datasets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llm_cxr.data.schema import (
    DEVICES,
    PATHOLOGIES,
    Finding,
    dataset_features,
    labels_from_findings,
)
from llm_cxr.data.synth import (
    Correlation,
    SynthConfig,
    generate_dataset,
    generate_study,
    parse_correlate,
    patient_plan,
    sample_anatomy,
    sample_findings,
)
from llm_cxr.data.synth_report import write_report
from llm_cxr.errors import ConfigError

# Every device at a high rate and no normal studies, so a few dozen studies cover everything.
BUSY = dict(normal_fraction=0.0, device_rates={d: 0.35 for d in DEVICES})

# What a report may call each finding (the labeler contract in synth_report's docstring).
TERMS = {
    "cardiomegaly": r"cardiomegaly|heart is enlarged|(cardiac silhouette is (\w+ )?enlarged)|"
                    r"enlarged cardiac silhouette|enlargement of the cardiac silhouette",
    "pleural_effusion": r"effusion",
    "pneumothorax": r"pneumothorax",
    "consolidation": r"consolidation|airspace opacity|airspace disease",
    "nodule": r"nodule",
    "mass": r"\bmass\b",
    "edema": r"edema",
    "atelectasis": r"atelectasis",
    "endotracheal_tube": r"endotracheal tube|et tube",
    "central_line": r"central venous catheter|central line",
    "chest_tube": r"chest tube",
    "pacemaker": r"pacemaker",
}
NEGATION = re.compile(r"^(no |there is no |there are no )|\bnot (seen|enlarged)\b|\bwithout\b|within normal limits")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\b\d+\. ", "", text.lower())  # numbered impressions
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


@pytest.fixture(scope="module")
def studies():
    cfg = SynthConfig(size=64, **BUSY)
    return [generate_study(np.random.default_rng([5, i]), cfg) for i in range(80)]


def test_same_seed_same_study_and_different_seed_differs():
    cfg = SynthConfig(size=64)
    a = generate_study(np.random.default_rng([1, 2]), cfg)
    b = generate_study(np.random.default_rng([1, 2]), cfg)
    c = generate_study(np.random.default_rng([1, 3]), cfg)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64)
    assert np.array_equal(a.image, b.image) and a.report == b.report
    assert a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not np.array_equal(a.image, c.image)


def test_image_looks_like_a_chest_film(studies):
    for st in studies[:20]:
        img = st.image.astype(float)
        lungs, body, heart = st.anatomy["lungs"], st.anatomy["body"], st.anatomy["heart"]
        air = ~body
        air[:, 8:-8] = False  # the outer columns beside the body
        assert img[air].mean() < 60, "air outside the body must be dark"
        assert img[lungs].mean() < img[body & ~lungs].mean() - 30, "aerated lung must be darker than soft tissue"
        assert img[heart].mean() > img[lungs].mean() + 30
        cols = np.where(heart.any(0))[0]
        assert (cols.mean() - 31.5) > 0, "the heart bulges to the patient's left (image right)"


def test_every_present_finding_has_a_mask_inside_the_body_on_its_side(studies):
    seen = set()
    for st in studies:
        assert set(st.masks) == {f.name for f in st.findings}
        for f in st.findings:
            m = st.masks[f.name]
            assert m.dtype == bool and m.shape == (64, 64) and m.any(), f.name
            assert (m & st.anatomy["body"]).sum() >= 0.9 * m.sum(), f"{f.name} mask outside the body"
            if f.laterality in ("left", "right") and f.name not in ("pacemaker", "central_line"):
                right_half = m[:, 32:].sum() / m.sum()  # the patient's left is the image's right
                assert (right_half > 0.5) == (f.laterality == "left"), (f.name, f.laterality, right_half)
            seen.add(f.name)
    assert seen == set(PATHOLOGIES) | set(DEVICES)


def test_cardiothoracic_ratio_from_the_rendered_masks(studies):
    def width(m):
        cols = np.where(m.any(0))[0]
        return cols.max() - cols.min() + 1

    normal, enlarged = [], []
    for st in studies:
        ctr = width(st.anatomy["heart"]) / width(st.anatomy["lungs"])
        cm = [f for f in st.findings if f.name == "cardiomegaly"]
        (enlarged if cm else normal).append(ctr)
        if cm:
            assert (abs(ctr - cm[0].extra["ctr"]) < 0.08
                    and np.array_equal(st.masks["cardiomegaly"], st.anatomy["heart"]))
    assert enlarged and normal
    assert min(enlarged) > 0.5 and max(normal) < 0.5


def test_nodule_size_follows_the_mm_scale():
    cfg = SynthConfig(size=128, normal_fraction=0.0, pathology_weights={"nodule": 1.0},
                      n_pathologies_probs=(1.0, 0.0, 0.0), device_rates={})
    for i in range(6):
        st = generate_study(np.random.default_rng([9, i]), cfg)
        (f,) = st.findings
        diameter_px = 2 * np.sqrt(st.masks["nodule"].sum() / np.pi)
        assert diameter_px >= 3.5
        assert abs(diameter_px * st.mm_per_px - f.size_mm) < 0.25 * f.size_mm + 2 * st.mm_per_px


def test_report_names_every_finding_and_only_negates_absent_ones(studies):
    for st in studies:
        text = st.report.lower()
        assert text.startswith("findings: ") and "\nimpression: " in text
        present = {f.name for f in st.findings}
        for name in present:
            assert re.search(TERMS[name], text), (name, st.report)
        for s in _sentences(st.findings_text + " " + st.impression_text):
            for name, pattern in TERMS.items():
                if re.search(pattern, s) and name not in present:
                    assert NEGATION.search(s), (name, s)
                if re.search(pattern, s) and name in present:
                    assert not s.startswith(("no ", "there is no ")), (name, s)
        assert not re.search(r"possible|may represent|suggest|likely", text)


def test_report_wording_for_fixed_findings():
    rng = np.random.default_rng(0)
    texts = [write_report([Finding("pleural_effusion", "left", "basal", "moderate")], rng) for _ in range(30)]
    assert all("left" in f and "effusion" in f and "moderate" in f.lower() for f, _ in texts)
    assert len({f for f, _ in texts}) >= 4, "several phrasings"
    assert all("lungs are clear" not in f.lower() for f, _ in texts)
    normal = [write_report([], rng) for _ in range(30)]
    assert all(re.match(r"No acute|No active", imp) for _, imp in normal)
    assert any("lungs are clear" in f.lower() or "clear lungs" in f.lower() for f, _ in normal)
    nod = write_report([Finding("nodule", "right", "right upper lobe", size_mm=12.0)], rng)
    assert "12 mm" in nod[0] and "right upper lobe" in nod[0]


def test_correlate_rate_is_respected():
    cfg = SynthConfig(correlations=[parse_correlate("pneumothorax:chest_tube:0.9")])
    base = cfg.device_rates["chest_tube"]
    with_f, without_f = [], []
    for i in range(4000):
        names = {f.name for f in sample_findings(np.random.default_rng([3, i]), cfg)}
        (with_f if "pneumothorax" in names else without_f).append("chest_tube" in names)
    assert len(with_f) > 200
    assert abs(np.mean(with_f) - 0.9) < 0.05
    assert abs(np.mean(without_f) - base) < 0.02
    # and without the correlation the device keeps its base rate among pneumothoraces
    plain = SynthConfig()
    tubes = [("chest_tube" in n) for n in ({f.name for f in sample_findings(np.random.default_rng([3, i]), plain)}
                                           for i in range(4000)) if "pneumothorax" in n]
    assert np.mean(tubes) < 0.15


def test_chest_tube_goes_on_the_side_of_the_pneumothorax():
    cfg = SynthConfig(normal_fraction=0.0, pathology_weights={"pneumothorax": 1.0},
                      n_pathologies_probs=(1.0, 0.0, 0.0), correlations=[("pneumothorax", "chest_tube", 1.0)])
    for i in range(30):
        fs = {f.name: f for f in sample_findings(np.random.default_rng([4, i]), cfg)}
        assert fs["chest_tube"].laterality == fs["pneumothorax"].laterality


@pytest.mark.parametrize("spec", ["pneumothorax:chest_tube", "pneumothorax:chest_tube:1.5", "pneumothorax:chest_tube:x",
                                  "pneumonia:chest_tube:0.5", "chest_tube:pneumothorax:0.5", "a:b:c:d"])
def test_invalid_correlate_specs_raise_clear_errors(spec):
    with pytest.raises(ConfigError,
                       match=re.escape(spec.split(":")[0]) if spec.count(":") == 2 else "FINDING:DEVICE:RATE"):
        parse_correlate(spec)


def test_valid_correlate_spec():
    assert parse_correlate(" pneumothorax:chest_tube:0.95 ") == Correlation("pneumothorax", "chest_tube", 0.95)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=32), "64 to 512"), (dict(size=1024), "64 to 512"), (dict(size=128.5), "64 to 512"),
    (dict(images_per_patient=0.5), "images_per_patient"), (dict(split_fractions=(0.5, 0.2, 0.2)), "split_fractions"),
    (dict(device_rates={"stent": 0.1}), "stent"), (dict(pathology_weights={"cardiomegaly": -1}), "cardiomegaly"),
    (dict(normal_fraction=1.5), "normal_fraction"),
])
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SynthConfig(**kwargs)


def test_patient_plan_and_shared_anatomy():
    plan = patient_plan(500, seed=1, images_per_patient=2.0)
    assert len(plan) == 500 and plan == sorted(plan)
    assert 1.7 < 500 / len(set(plan)) < 2.3
    assert patient_plan(500, 1, 2.0) == plan and patient_plan(1, 1, 1.0) == [0]
    a, b = sample_anatomy(np.random.default_rng([1, 1, 7])), sample_anatomy(np.random.default_rng([1, 1, 7]))
    assert a == b


def _rows(path):
    from llm_cxr.data.dataset import load_dataset

    return load_dataset(path)


def test_written_dataset_schema_splits_and_workers(tmp_path):
    cfg = SynthConfig(size=64, images_per_patient=2.0, **BUSY)
    s1 = generate_dataset(24, tmp_path / "a", cfg, seed=7, workers=1, progress=False)
    s2 = generate_dataset(24, tmp_path / "b", cfg, seed=7, workers=2, progress=False)
    assert s1.n_rows == s2.n_rows == 24 and s1.n_bad == 0 and sum(s1.splits.values()) == 24
    ds1, ds2 = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert ds1.features == dataset_features()
    split_of: dict[str, str] = {}
    for r1, r2 in zip(ds1, ds2):
        assert r1["id"] == r2["id"] and r1["report"] == r2["report"] and r1["findings"] == r2["findings"]
        assert np.array_equal(np.asarray(r1["image"]), np.asarray(r2["image"]))
        assert r1["image"].mode == "L" and r1["image"].size == (64, 64) and r1["source"] == "synthetic"
        findings = [Finding.from_dict(d) for d in json.loads(r1["findings"])]
        assert r1["labels"] == labels_from_findings(findings)
        assert [m["finding"] for m in r1["masks"]] == [f.name for f in findings]
        for m in r1["masks"]:
            arr = np.asarray(m["mask"])
            assert set(np.unique(arr)) <= {0, 255} and arr.max() == 255
        assert split_of.setdefault(r1["patient_id"], r1["split"]) == r1["split"], "a patient in two splits"
        assert json.loads(r1["meta"])["size"] == 64
    assert len(split_of) < 24, "some patients have several studies"


def test_a_failing_study_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    import llm_cxr.data.synth as synth

    real, calls = synth.generate_study, []

    def flaky(rng, cfg, patient=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(rng, cfg, patient)

    monkeypatch.setattr(synth, "generate_study", flaky)
    summary = generate_dataset(4, tmp_path / "ds", SynthConfig(size=64), seed=0, progress=False)
    assert summary.n_rows == 3 and summary.n_bad == 1
    assert summary.bad_items[0].item == "synth-0-000001" and "boom" in summary.bad_items[0].problem
    assert [r["id"] for r in _rows(tmp_path / "ds")] == ["synth-0-000000", "synth-0-000002", "synth-0-000003"]
    assert "boom" in (tmp_path / "ds" / "bad_items.jsonl").read_text()


def test_interrupted_synthesis_resumes_after_its_last_chunk(tmp_path, monkeypatch):
    import llm_cxr.data.synth as synth
    from llm_cxr.data import dataset
    from llm_cxr.data.dataset import load_dataset

    monkeypatch.setattr(dataset, "CHUNK_ROWS", 4)
    cfg = SynthConfig(size=64)
    generate_dataset(11, tmp_path / "ref", cfg, seed=3, progress=False)
    real, made, stop = synth._make_row, [], [9]

    def interrupted(task, **kw):
        if task[0] in stop:
            stop.clear()
            raise KeyboardInterrupt  # as a kill would, with two chunks (8 studies) written
        made.append(task[0])
        return real(task, **kw)

    monkeypatch.setattr(synth, "_make_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(11, tmp_path / "ds", cfg, seed=3, progress=False)
    made.clear()
    summary = generate_dataset(11, tmp_path / "ds", cfg, seed=3, progress=False)
    assert made == [8, 9, 10] and summary.n_rows == 11
    assert load_dataset(tmp_path / "ds").data.table.equals(load_dataset(tmp_path / "ref").data.table)


def test_other_seed_gives_other_dataset(tmp_path):
    cfg = SynthConfig(size=64)
    generate_dataset(3, tmp_path / "a", cfg, seed=1, progress=False)
    generate_dataset(3, tmp_path / "b", cfg, seed=2, progress=False)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a[0]["id"] == "synth-1-000000" and b[0]["id"] == "synth-2-000000"
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(b[0]["image"]))


def test_cli_synth(tmp_path, capsys):
    from llm_cxr.cli import main

    # -q is a global option of llm-cxr, so it comes before the subcommand.
    assert main(["-q", "data", "synth", "--n", "8", "--size", "64", "--out", str(tmp_path / "ds"),
                 "--correlate", "pneumothorax:chest_tube:0.95"]) == 0
    assert json.loads(capsys.readouterr().out)["n_rows"] == 8
    assert len(_rows(tmp_path / "ds")) == 8
    assert main(["-q", "data", "synth", "--n", "2", "--size", "16", "--out", str(tmp_path / "x")]) == 2
    assert "64 to 512" in capsys.readouterr().err


def test_progress_bars_written_to_a_pipe_update_rarely(tmp_path):
    """A command whose stderr is a file or a pipe (a log) gets a progress line every few seconds, not one per step."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llm_cxr", "data", "synth", "--n", "600", "--size", "64", "--out",
                           str(tmp_path / "ds")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    updates = [s for s in proc.stderr.replace("\r", "\n").splitlines() if "img/s" in s]
    assert 1 <= len(updates) <= 6, len(updates)
