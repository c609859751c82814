"""The rule-based report labeler: negation, uncertainty, laterality, devices, and agreement
with the synthetic ground truth and with the IU X-ray annotators' problem lists."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from llm_cxr.data.labeler import (
    LabelResult,
    compare_labels,
    dataset_labels,
    iu_reference_labels,
    label_report,
    label_reports,
)
from llm_cxr.data.labeler_rules import IU_REFERENCE_TERMS, AttributeRule, MentionRule
from llm_cxr.data.reports import format_report
from llm_cxr.data.schema import LABEL_NAMES, Finding


def labels(text: str) -> dict[str, int | None]:
    return label_report(text).labels


def finding(text: str, name: str) -> Finding:
    found = {f.name: f for f in label_report(text).findings}
    assert name in found, f"{name} not found in {text!r}"
    return found[name]


# --- negation ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "No focal consolidation, pleural effusion, or pneumothorax.",
    "There is no pleural effusion or pneumothorax and no consolidation.",
    "The lungs are clear without consolidation, effusion or pneumothorax.",
    "Negative for consolidation, pneumothorax and pleural effusion.",
    "Consolidation, pleural effusion and pneumothorax are not seen.",
])
def test_negated_list_negates_every_item(text):
    lab = labels(text)
    for name in ("consolidation", "pleural_effusion", "pneumothorax"):
        assert lab[name] == 0, (name, text)
    assert lab["no_finding"] == 1


@pytest.mark.parametrize("text, absent, present", [
    ("No pneumothorax, but there is a small right pleural effusion.", "pneumothorax",
     "pleural_effusion"),
    ("No pneumothorax; moderate left pleural effusion.", "pneumothorax", "pleural_effusion"),
    ("Mild cardiomegaly without pulmonary edema.", "edema", "cardiomegaly"),
    ("There is no effusion, however a right apical pneumothorax is present.", "pleural_effusion",
     "pneumothorax"),
    ("The pneumothorax has resolved. Stable right basilar atelectasis.", "pneumothorax",
     "atelectasis"),
    ("Small left effusion, the pneumothorax has resolved.", "pneumothorax", "pleural_effusion"),
    ("Small left effusion, pneumothorax has resolved.", "pneumothorax", "pleural_effusion"),
])
def test_negation_scope_ends_at_clause_breaks(text, absent, present):
    lab = labels(text)
    assert lab[absent] == 0
    assert lab[present] == 1


def test_post_negation_and_removed_devices():
    assert labels("Previously noted left pleural effusion has resolved.")["pleural_effusion"] == 0
    assert labels("A pneumothorax is not identified.")["pneumothorax"] == 0
    lab = labels("Interval removal of the right chest tube.")
    assert lab["chest_tube"] == 0 and lab["support_devices"] == 0
    assert labels("The left chest tube has been removed.")["chest_tube"] == 0


def test_no_change_is_not_a_negation():
    lab = labels("No significant change in the small left pleural effusion.")
    assert lab["pleural_effusion"] == 1


def test_negated_doubt_is_negative():
    assert labels("There is no focal opacity to suggest pneumonia.")["pneumonia"] == 0


# --- uncertainty -------------------------------------------------------------------------


@pytest.mark.parametrize("text, name", [
    ("Possible right lower lobe pneumonia.", "pneumonia"),
    ("Pneumonia cannot be excluded.", "pneumonia"),
    ("Cannot exclude a small left pleural effusion.", "pleural_effusion"),
    ("Findings are suspicious for pulmonary edema.", "edema"),
    ("Appearance is concerning for a developing consolidation.", "consolidation"),
    ("Questionable tiny apical pneumothorax.", "pneumothorax"),
    ("Left basilar opacity likely reflects atelectasis.", "atelectasis"),
    ("Streaky opacity which could represent atelectasis.", "atelectasis"),
    ("Findings suggest early interstitial edema.", "edema"),
    ("Is there a pneumothorax?", "pneumothorax"),
])
def test_uncertainty_cues(text, name):
    assert labels(text)[name] == -1


def test_versus_makes_both_sides_uncertain_and_keeps_the_opacity():
    lab = labels("Atelectasis versus infiltrate at the left base.")
    assert lab["atelectasis"] == -1 and lab["lung_opacity"] == -1
    lab = labels("Left basilar opacity, atelectasis versus pneumonia.")
    assert lab["lung_opacity"] == 1 and lab["atelectasis"] == -1 and lab["pneumonia"] == -1
    assert lab["no_finding"] == 0


def test_positive_mention_wins_over_negative_and_uncertain_ones():
    lab = labels("No effusion on the right. Small left pleural effusion. Possible effusion.")
    assert lab["pleural_effusion"] == 1


# --- heart and mediastinum ---------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Heart size is normal.", 0),
    ("The heart is normal in size.", 0),
    ("The heart is not enlarged.", 0),
    ("Normal heart size and mediastinal contours.", 0),
    ("Heart size is at the upper limits of normal.", 0),
    ("The cardiac silhouette is within normal limits.", 0),
    ("The heart is mildly enlarged.", 1),
    ("Enlarged cardiac silhouette.", 1),
    ("Moderate cardiomegaly.", 1),
    ("Borderline heart size.", -1),
    ("No evidence of cardiac enlargement.", 0),
])
def test_heart_size(text, expected):
    assert labels(text)["cardiomegaly"] == expected


def test_cardiomediastinal_silhouette():
    lab = labels("The cardiomediastinal silhouette is within normal limits.")
    assert lab["cardiomegaly"] == 0 and lab["enlarged_cardiomediastinum"] == 0
    lab = labels("Enlarged cardiomediastinal silhouette.")
    assert lab["enlarged_cardiomediastinum"] == 1 and lab["cardiomegaly"] == -1
    assert labels("The mediastinum is widened.")["enlarged_cardiomediastinum"] == 1
    assert labels("No mediastinal widening.")["enlarged_cardiomediastinum"] == 0


def test_structures_without_a_state_say_nothing():
    lab = labels("The heart and mediastinum are stable in appearance.")
    assert lab["cardiomegaly"] is None and lab["enlarged_cardiomediastinum"] is None
    assert lab["no_finding"] == 1


def test_clear_lungs_and_sharp_angles_are_negative():
    lab = labels("The lungs are clear. The costophrenic angles are sharp.")
    assert lab["lung_opacity"] == 0 and lab["pleural_effusion"] == 0


# --- laterality, location, severity, size -------------------------------------------------


@pytest.mark.parametrize("text, name, side", [
    ("Small left pleural effusion.", "pleural_effusion", "left"),
    ("Bilateral pleural effusions.", "pleural_effusion", "bilateral"),
    ("Pleural effusions, right greater than left.", "pleural_effusion", "bilateral"),
    ("Left effusion. Right effusion.", "pleural_effusion", "bilateral"),
    ("There is a right-sided pneumothorax.", "pneumothorax", "right"),
    ("A moderate pneumothorax is present on the left.", "pneumothorax", "left"),
    ("Bibasilar atelectasis.", "atelectasis", "bilateral"),
    ("Consolidation in the right upper lobe.", "consolidation", "right"),
    ("Left lower lobe consolidation and a small right pleural effusion.", "pleural_effusion",
     "right"),
    ("Left lower lobe consolidation and a small right pleural effusion.", "consolidation", "left"),
    ("Left-sided pacemaker with leads in the right atrium and right ventricle.", "pacemaker",
     "left"),
])
def test_laterality(text, name, side):
    assert finding(text, name).laterality == side


def test_laterality_absent_when_not_stated():
    assert finding("Moderate pulmonary edema.", "edema").laterality is None


def test_location_severity_and_size():
    f = finding("A 1.5 cm nodule in the left upper lobe.", "nodule")
    assert (f.laterality, f.location, f.size_mm) == ("left", "left upper lobe", 15.0)
    f = finding("There is a large right pleural effusion.", "pleural_effusion")
    assert f.severity == "large"
    f = finding("The heart is moderately enlarged.", "cardiomegaly")
    assert f.severity == "moderate"
    f = finding("Possible right middle lobe pneumonia and consolidation.", "consolidation")
    assert f.extra == {"uncertain": True}


# --- devices and no finding ---------------------------------------------------------------


def test_devices_and_their_sides():
    text = ("Endotracheal tube tip 4 cm above the carina. Right internal jugular central venous "
            "catheter terminates in the SVC. Left chest tube in place. Left-sided pacemaker. "
            "Nasogastric tube courses below the diaphragm.")
    result = label_report(text)
    for name in ("endotracheal_tube", "central_line", "chest_tube", "pacemaker", "support_devices"):
        assert result.labels[name] == 1, name
    sides = {f.name: f.laterality for f in result.findings}
    assert sides == {"endotracheal_tube": None, "central_line": "right", "chest_tube": "left",
                     "pacemaker": "left"}
    assert result.labels["no_finding"] == 1  # devices are not pathology (CheXpert)
    assert labels("Left PICC line tip in the distal SVC.")["central_line"] == 1
    only_ng = labels("Feeding tube tip in the stomach.")
    assert only_ng["support_devices"] == 1 and only_ng["central_line"] is None


@pytest.mark.parametrize("text", [
    "Bilateral chest wall ports.",
    "Right internal jugular Permacath.",
    "Implantable loop recorder projects over the left chest.",
    "Intra-aortic balloon pump in place.",
    "ECMO cannula terminating in the right atrium.",
    "IVC filter in the upper abdomen.",
    "Ventriculoperitoneal shunt tubing along the right chest wall.",
    "Defibrillator pads over the left chest.",
    "Postsurgical hardware in the cervical spine.",
    "Right shoulder arthroplasty.",
    "Bone anchors in the left humeral head.",
    "Plate and screws fixing the right clavicle.",
    "Embolization coils in the right lower lobe.",
])
def test_devices_named_by_type(text):
    lab = labels(text)
    assert lab["support_devices"] == 1, text
    assert lab["no_finding"] == 1  # devices are not pathology


@pytest.mark.parametrize("text", [
    "Median sternotomy wires are intact.",
    "Surgical clips in the left axilla.",
    "Coronary artery stents.",
    "Endplate degenerative changes of the thoracic spine.",
    "End plate osteophytes of the lower thoracic spine.",
])
def test_clips_wires_stents_and_end_plates_are_not_support_devices(text):
    assert labels(text)["support_devices"] is None, text


def test_external_pads_are_no_pacemaker():
    for text in ("Defibrillator pads over the left chest.", "External pacer pads."):
        lab = labels(text)
        assert lab["support_devices"] == 1 and lab["pacemaker"] is None, text


def test_plate_like_atelectasis_is_no_device():
    for text in ("Plate-like atelectasis at the right base.", "Left basilar plate atelectasis."):
        lab = labels(text)
        assert lab["atelectasis"] == 1 and lab["support_devices"] is None, text
    assert labels("No orthopedic hardware.")["support_devices"] == 0


# --- edema and lung lesions ---------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "No pulmonary edema or vascular congestion.",
    "Normal pulmonary vascularity without edema.",
    "The pulmonary vessels are not engorged.",
    "There are no findings of heart failure.",
    "No signs of overt pulmonary edema.",
    "Interval resolution of the interstitial edema.",
    "Pleural effusions, consolidation and edema are not seen.",
])
def test_negated_edema(text):
    assert labels(text)["edema"] == 0, text


@pytest.mark.parametrize("text, expected", [
    ("Indistinct pulmonary vascular margins.", 1),
    ("The vascular margination is indistinct at both hila.", 1),
    ("Vascular margins are normal.", 0),
    ("Central vascular congestion.", 1),
    ("Opacities may reflect infection or early edema.", -1),
    ("The differential includes atypical infection and interstitial edema.", -1),
])
def test_edema_vascular_signs_and_hedges(text, expected):
    lab = labels(text)
    assert lab["edema"] == expected, text
    if "edema" not in text:
        assert lab["lung_opacity"] is None  # vascular signs are no parenchymal opacity


@pytest.mark.parametrize("text, expected", [
    ("No suspicious pulmonary nodule or mass.", 0),
    ("Nodules or masses are not identified.", 0),
    ("No focal nodule, mass or consolidation.", 0),
    ("Bilateral apical fibronodular infiltrates.", 1),
    ("Cavitary lesion in the left apex.", 1),
    ("Right hilar mass.", 1),
    ("Calcified granulomas in both lungs.", None),
    ("Pericardial mass versus prominent epicardial fat.", None),
    ("Left pleural mass.", None),
    ("Anterior mediastinal mass.", None),
    ("Soft tissue mass over the right shoulder.", None),
    ("CT would be more sensitive for detecting small nodules.", -1),
    ("Recommend CT for further evaluation for nodules.", -1),
])
def test_lung_lesion_phrasings(text, expected):
    assert labels(text)["lung_lesion"] == expected, text


def test_fibronodular_infiltrate_is_a_nodular_opacity():
    lab = labels("Fibronodular infiltrates in the right upper lobe.")
    assert lab["nodule"] == 1 and lab["lung_opacity"] == 1


def test_no_finding_logic():
    assert labels("Normal chest. No acute cardiopulmonary abnormality.")["no_finding"] == 1
    assert labels("Possible small left pleural effusion.")["no_finding"] == 0
    assert labels("Healed right rib fracture.")["no_finding"] == 0
    assert labels("Mild biapical pleural thickening.")["no_finding"] == 0


# --- input handling -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n ", "XXXX XXXX.", "XXXX, XXXX XXXX XXXX."])
def test_empty_and_anonymised_only_text(text):
    result = label_report(text)
    assert set(result.labels) == set(LABEL_NAMES)
    assert all(v is None for v in result.labels.values())
    assert result.findings == [] and result.mentions == []
    assert set(result.binary().values()) == {0}


def test_anonymised_words_inside_real_sentences():
    lab = labels("There are no XXXX of a pleural effusion. XXXX left basilar atelectasis.")
    assert lab["pleural_effusion"] == 0 and lab["atelectasis"] == 1


def test_only_findings_and_impression_are_read():
    text = ("INDICATION: Cough, rule out pneumonia.\nCOMPARISON: None.\n"
            "FINDINGS: The lungs are clear.\nIMPRESSION: No acute disease.")
    lab = labels(text)
    assert lab["pneumonia"] is None and lab["no_finding"] == 1
    assert labels("Cough. Evaluate for pneumonia.")["pneumonia"] == -1


def test_non_string_input_is_rejected():
    with pytest.raises(TypeError, match="expects a str"):
        label_report(None)  # type: ignore[arg-type]


# --- result objects -----------------------------------------------------------------------


def test_result_formats_and_evidence():
    text = ("FINDINGS: No pneumothorax. Possible small right pleural effusion.\n"
            "IMPRESSION: Cardiomegaly.")
    result = label_report(text)
    assert list(result.labels) == list(LABEL_NAMES)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["labels"]["cardiomegaly"] == 1 and d["labels"]["pneumothorax"] == 0
    assert {"name": "pleural_effusion", "laterality": "right", "severity": "small",
            "extra": {"uncertain": True}} in d["findings"]
    for m in result.mentions:
        assert m.sentence[m.span[0]:m.span[1]] == m.phrase
    by_label = {m.label: m for m in result.mentions}
    assert by_label["pneumothorax"].cue == "no" and by_label["pleural_effusion"].cue == "possible"
    assert result.binary()["pleural_effusion"] == 1
    assert result.binary(uncertain_as=0)["pleural_effusion"] == 0
    assert result.binary()["fracture"] == 0  # not mentioned
    with pytest.raises(ValueError, match="uncertain_as"):
        result.binary(uncertain_as=2)
    lab, findings = dataset_labels(text)
    assert lab["pleural_effusion"] == -1 and lab["cardiomegaly"] == 1 and lab["fracture"] == 0
    assert set(lab) == set(LABEL_NAMES) and set(lab.values()) <= {-1, 0, 1}
    assert [f.name for f in findings] == ["cardiomegaly", "pleural_effusion"]


def test_batch_equals_single_and_is_deterministic():
    texts = ["No pneumothorax.", "Left effusion.", "", "Possible pneumonia."]
    batch = label_reports(texts)
    assert [r.to_dict() for r in batch] == [label_report(t).to_dict() for t in texts]
    assert [r.to_dict() for r in batch] == [r.to_dict() for r in label_reports(texts)]
    assert all(isinstance(r, LabelResult) for r in batch)


def test_rules_reject_unknown_labels():
    with pytest.raises(ValueError, match="unknown labels"):
        MentionRule(("not_a_label",), r"foo")
    with pytest.raises(ValueError, match="state pattern"):
        AttributeRule(("cardiomegaly",), r"heart")


def test_compare_labels_counts():
    pred = [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 0, "b": -1}]
    ref = [{"a": 1, "b": 0}, {"a": 0, "b": 1}, {"a": 1, "b": 1}]
    agree = compare_labels(pred, ref, classes=["a", "b"])
    assert agree.per_class["a"]["precision"] == pytest.approx(0.5)
    assert agree.per_class["a"]["recall"] == pytest.approx(0.5)
    assert agree.per_class["b"]["precision"] == pytest.approx(1.0)
    assert agree.per_class["b"]["recall"] == pytest.approx(0.5)
    assert agree.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="references"):
        compare_labels(pred[:2], ref)


def test_iu_reference_mapping():
    ref = iu_reference_labels("Opacity/lung/base/left;Catheters, Indwelling/right;"
                              "Cardiac Shadow/enlarged")
    assert ref["lung_opacity"] == 1 and ref["support_devices"] == 1 and ref["cardiomegaly"] == 1
    assert ref["pleural_effusion"] == 0
    assert iu_reference_labels("Opacity/ribs/left")["lung_opacity"] == 0
    assert set(iu_reference_labels("normal").values()) == {0}


@pytest.mark.parametrize("mesh, lesion", [
    ("Nodule/lung/upper lobe/left", 1),
    ("Mass/lung/hilum/right", 1),
    ("Cavitation/lung/apex/left", 1),
    # a round opacity in the lung is a nodule ...
    ("Opacity/lung/lower lobe/right/round/small", 1),
    ("Density/lung/middle lobe/right/round", 1),
    # ... unless it is not placed in the lung, or it is a round calcification / granuloma
    ("Density/ribs/left/round", 0),
    ("Opacity/round", 0),
    ("Density/lung/base/left/round;Calcinosis/lung/base/left/round", 0),
    ("Opacity/lung/apex/right/round;Granuloma/lung/apex/right/round", 0),
    ("Calcified Granuloma/lung/upper lobe/right", 0),
    ("Opacity/lung/base/left/patchy", 0),
])
def test_iu_reference_lung_lesion(mesh, lesion):
    assert iu_reference_labels(mesh)["lung_lesion"] == lesion


def test_iu_reference_support_devices():
    assert iu_reference_labels("Implanted Medical Device/humerus/left")["support_devices"] == 1
    for mesh in ("Surgical Instruments/mediastinum", "Stents/coronary vessels", "Sutures/lung",
                 "Foreign Bodies/thorax/right"):
        assert iu_reference_labels(mesh)["support_devices"] == 0, mesh


# --- synthetic reports ----------------------------------------------------------------------


def test_recovers_synthetic_ground_truth():
    synth = pytest.importorskip("llm_cxr.data.synth")
    from llm_cxr.data.synth_report import write_report

    rng = np.random.default_rng(1234)
    cfg = synth.SynthConfig()
    n, exact, lat_ok, lat_n = 400, 0, 0, 0
    for _ in range(n):
        truth = synth.sample_findings(rng, cfg)
        result = label_report(format_report(*write_report(truth, rng)))
        exact += result.positive_findings() == {f.name for f in truth}
        found = {f.name: f for f in result.findings}
        for f in truth:
            if f.laterality and f.name in found:
                lat_n += 1
                lat_ok += found[f.name].laterality == f.laterality
    assert exact / n >= 0.995
    assert lat_n > 100 and lat_ok / lat_n >= 0.99


def test_reads_generated_studies():
    synth = pytest.importorskip("llm_cxr.data.synth")
    cfg = synth.SynthConfig(size=64, normal_fraction=0.2)
    for i in range(30):
        study = synth.generate_study(np.random.default_rng([99, i]), cfg)
        assert label_report(study.report).positive_findings() == {f.name for f in study.findings}, \
            study.report


# --- real reports (IU X-ray) ----------------------------------------------------------------


def _iu_rows(shared_data):
    path = shared_data / "iu-reports-dev.csv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_iu_macro_f1_floor_and_speed(shared_data):
    rows = _iu_rows(shared_data)
    texts = [f"FINDINGS: {r['findings']}\nIMPRESSION: {r['impression']}" for r in rows]
    t0 = time.perf_counter()
    results = label_reports(texts)
    seconds = time.perf_counter() - t0
    refs = [iu_reference_labels(r["MeSH"]) for r in rows]
    for uncertain_as in (1, 0):
        agree = compare_labels([r.binary(uncertain_as) for r in results], refs, IU_REFERENCE_TERMS)
        assert agree.macro_f1 >= 0.75, (uncertain_as, agree.per_class)
    assert seconds < 10.0, f"labelling {len(texts)} reports took {seconds:.1f} s"
