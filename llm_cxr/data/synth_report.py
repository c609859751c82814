"""Radiology-style report text for a synthetic study, written from its ground-truth findings.

The register imitates frontal chest radiograph reports (FINDINGS / IMPRESSION) as found in
public collections such as IU X-ray (Demner-Fushman et al., JAMIA 2016) and MIMIC-CXR
(Johnson et al., Sci. Data 2019); no report text from either is reproduced here.

The contract with the report labeler (``llm_cxr.data.labeler``) is strict, so that
labels read back from these reports equal the planted ground truth:

* every present finding is stated affirmatively, with its standard name or a common
  synonym, and its laterality word where it has one ("left", "right", "bilateral",
  "bilaterally", "on the left", "right-sided", "left-sided"; "bibasilar" is never used);
  edema is always called bilateral; device sentences may name other sides too ("left-sided
  pacemaker with leads in the right atrium"), the device's own side comes first;
* terms used per finding: cardiomegaly ("cardiomegaly", "the heart is enlarged",
  "enlarged cardiac silhouette", "the cardiac silhouette is enlarged", "enlargement of the
  cardiac silhouette"); pleural_effusion
  ("pleural effusion(s)", "effusion"); pneumothorax; consolidation ("consolidation",
  "airspace opacity", "airspace disease"); nodule; mass; edema ("pulmonary edema",
  "interstitial edema"); atelectasis; endotracheal_tube ("endotracheal tube",
  "ET tube"); central_line ("central venous catheter", "central line"); chest_tube
  ("chest tube"); pacemaker;
* the word "opacity" is only ever used for consolidation;
* an absent finding is only ever mentioned negated: "No ...", "There is no ...",
  "No evidence of ...", "... is not seen", "... is not enlarged", "... without ...",
  "... within normal limits" / "... is normal" (heart size only);
* a finding that is present is never also mentioned in negated form (not even for the
  other side), and no hedging ("possible", "may represent", "suggestive of") is used.
* absent devices are never mentioned.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llm_cxr.data.schema import DEVICES, Finding

# Findings whose absence may be stated as a pertinent negative, with the words used.
_NEGATABLE: dict[str, tuple[str, ...]] = {
    "pleural_effusion": ("pleural effusion",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("focal consolidation", "focal airspace disease", "focal airspace consolidation"),
    "edema": ("pulmonary edema",),
}
# How likely each pertinent negative is stated when the finding is absent.
_NEG_PROB = {"pleural_effusion": 0.85, "pneumothorax": 0.8, "consolidation": 0.75, "edema": 0.35}
_LUNG_PATHOLOGIES = ("pleural_effusion", "pneumothorax", "consolidation", "nodule", "mass",
                     "edema", "atelectasis")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _side_words(f: Finding) -> dict[str, str]:
    side = f.laterality or ""
    sided = {"left": "left-sided", "right": "right-sided", "bilateral": "bilateral"}.get(side, "")
    on = {"left": "on the left", "right": "on the right", "bilateral": "bilaterally"}.get(side, "")
    return {"side": side, "sided": sided, "on_side": on}


def _fmt(f: Finding) -> dict[str, str]:
    size = f.size_mm or 0.0
    return {
        **_side_words(f),
        "sev": f.severity or "",
        "lobe": f.location or "",
        "mm": f"{size:.0f} mm",
        "cm": f"{size / 10:.1f} cm",
        "pattern": str(f.extra.get("pattern", "patchy")),
        "cm_above": f"{float(f.extra.get('tip_above_carina_cm', 4.0)):.0f} cm",
        "vein": str(f.extra.get("vein", "internal jugular")),
    }


# ---- affirmative sentences, one list of phrasings per finding -------------------------------

_POSITIVE: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        "{Sev}cardiomegaly.",
        "The heart is enlarged.",
        "The cardiac silhouette is {sev_adv}enlarged.",
        "{Sev}enlargement of the cardiac silhouette.",
        "Enlarged cardiac silhouette.",
    ),
    "pleural_effusion": (
        "{Sev} {side} pleural effusion.",
        "There is a {sev} {sided} pleural effusion.",
        "{Sev} pleural effusion {on_side}.",
        "Blunting of the {side} costophrenic angle with a {sev} pleural effusion.",
        "A {sev} {side} effusion is present.",
    ),
    "pleural_effusion_bilateral": (
        "{Sev} bilateral pleural effusions.",
        "There are {sev} bilateral pleural effusions.",
        "{Sev} pleural effusions bilaterally.",
        "Blunting of both costophrenic angles with {sev} bilateral pleural effusions.",
    ),
    "pneumothorax": (
        "{Sev} {side} pneumothorax.",
        "There is a {sev} {sided} pneumothorax with a visible pleural line.",
        "{Sev} {side} apical pneumothorax.",
        "A {sev} pneumothorax is present {on_side}.",
    ),
    "consolidation": (
        "{Pattern} consolidation in the {lobe}.",
        "There is {pattern} airspace opacity in the {lobe}.",
        "{Lobe} consolidation{bronch}.",
        "Focal airspace disease in the {lobe}.",
        "Airspace consolidation is present in the {lobe}{bronch}.",
    ),
    "nodule": (
        "A {mm} nodule in the {lobe}.",
        "There is a {mm} pulmonary nodule in the {lobe}.",
        "{Lobe} nodule measuring {mm}.",
        "A well-circumscribed {mm} nodule projects over the {lobe}.",
    ),
    "mass": (
        "A {cm} mass in the {lobe}.",
        "There is a {mm} mass in the {lobe}.",
        "{Lobe} mass measuring approximately {cm}.",
        "A {side} lung mass in the {lobe}, measuring {cm}.",
    ),
    "edema": (
        "{Sev} bilateral pulmonary edema.",
        "{Sev} pulmonary edema with bilateral perihilar haziness.",
        "Pulmonary vascular congestion with {sev} bilateral interstitial edema.",
        "{Sev} pulmonary edema with Kerley B lines bilaterally.",
    ),
    "atelectasis": (
        "Plate-like atelectasis at the {side} lung base.",
        "{Side} basilar atelectasis.",
        "Linear atelectasis in the {side} lower lobe.",
        "There is subsegmental atelectasis at the {side} base.",
    ),
    "endotracheal_tube": (
        "Endotracheal tube tip terminates approximately {cm_above} above the carina.",
        "An endotracheal tube is in place with its tip {cm_above} above the carina.",
        "ET tube in satisfactory position, {cm_above} above the carina.",
        "The endotracheal tube tip projects {cm_above} above the carina.",
    ),
    "central_line": (
        "{Side} {vein} central venous catheter with tip in the SVC.",
        "{Side} {vein} central line terminates in the superior vena cava.",
        "There is a {sided} central venous catheter, tip projecting over the SVC.",
        "A {side} {vein} central line is in place with its tip in the SVC.",
    ),
    "chest_tube": (
        "{Side} chest tube in place.",
        "A {sided} chest tube is present.",
        "{Side} chest tube with its tip directed toward the apex.",
        "There is a {side} chest tube.",
    ),
    "pacemaker": (
        "{Side}-sided pacemaker with leads in the right atrium and right ventricle.",
        "{Side} chest wall pacemaker with leads projecting over the right atrium and right ventricle.",
        "A dual-lead pacemaker is present, with the generator in the {side} upper chest.",
        "Cardiac pacemaker in the {side} upper chest with leads terminating in the right heart.",
    ),
}

# Short impression phrases for present findings.
_IMPRESSION: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("{Sev}cardiomegaly.", "Cardiomegaly.", "Enlarged cardiac silhouette."),
    "pleural_effusion": ("{Sev} {side} pleural effusion{s}.", "{Side} pleural effusion{s}, {sev}.",
                         "{Sev} pleural effusion{s} {on_side}."),
    "pneumothorax": ("{Sev} {side} pneumothorax.", "{Side} pneumothorax, {sev}."),
    "consolidation": ("{Lobe} consolidation.", "{Pattern} airspace opacity in the {lobe}."),
    "nodule": ("{mm} {lobe} nodule.", "{Lobe} pulmonary nodule ({mm})."),
    "mass": ("{Cm} {lobe} mass.", "{Lobe} mass ({cm})."),
    "edema": ("{Sev} bilateral pulmonary edema.", "Bilateral pulmonary edema, {sev}."),
    "atelectasis": ("{Side} basilar atelectasis.", "Atelectasis at the {side} base."),
    "endotracheal_tube": ("Endotracheal tube in satisfactory position.",),
    "central_line": ("{Side} central venous catheter with tip in the SVC.",),
    "chest_tube": ("{Side} chest tube in place.",),
    "pacemaker": ("{Side}-sided pacemaker in place.",),
}

_HEART_NORMAL = (
    "Heart size is normal.",
    "The cardiomediastinal silhouette is within normal limits.",
    "The heart is normal in size.",
    "Normal heart size and mediastinal contours.",
    "The cardiac silhouette is not enlarged.",
)
_LUNGS_CLEAR = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "The lungs are well expanded and clear.",
    "Clear lungs.",
)
_NO_ACUTE = (
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary disease.",
    "No active disease.",
)
_BONES = (
    "No acute osseous abnormality.",
    "The visualized osseous structures are unremarkable.",
    "No acute bony abnormality.",
)


def _render(template: str, f: Finding) -> str:
    """Fill a template; capitalised field names ({Side}) give capitalised values."""
    vals = _fmt(f)
    sev = vals["sev"]
    vals["sev_adv"] = {"mild": "mildly ", "moderate": "moderately ", "severe": "severely "}.get(sev, "")
    vals["Sev"] = _cap(sev) + " " if sev and f.name == "cardiomegaly" else _cap(sev)
    vals["s"] = "s" if f.laterality == "bilateral" and f.name == "pleural_effusion" else ""
    vals["bronch"] = " with air bronchograms" if f.extra.get("air_bronchograms") else ""
    for key in ("side", "lobe", "pattern", "cm", "sided"):
        vals[_cap(key)] = _cap(vals[key])
    out = template.format(**vals)
    return _cap(" ".join(out.split()))


def _positive_sentence(f: Finding, rng: np.random.Generator) -> str:
    options = _POSITIVE[f.name]
    if f.name == "cardiomegaly" and not f.severity:
        options = tuple(o for o in options if "{Sev}" not in o) or options
    if f.name == "pleural_effusion" and f.laterality == "bilateral":
        options = _POSITIVE["pleural_effusion_bilateral"]
    if f.name == "edema" and f.severity == "mild":  # Kerley lines are drawn only when not mild
        options = tuple(o for o in options if "Kerley" not in o)
    if f.name == "mass" and not f.laterality:
        options = tuple(o for o in options if "{side}" not in o)
    return _render(_pick(rng, options), f)


def _negatives(absent: list[str], rng: np.random.Generator) -> list[str]:
    """Pertinent negatives: sentences that mention only absent findings, each negated."""
    chosen = [n for n in absent if n in _NEGATABLE and rng.random() < _NEG_PROB[n]]
    terms = [_pick(rng, _NEGATABLE[n]) for n in chosen]
    extra = []
    if "nodule" in absent and "mass" in absent and rng.random() < 0.2:
        extra.append(_pick(rng, ("No suspicious pulmonary nodules or masses.",
                                 "There is no pulmonary nodule or mass.")))
    if not terms:
        return extra
    order = rng.permutation(len(terms)) if rng.random() < 0.3 else np.arange(len(terms))
    terms = [terms[i] for i in order]
    groups = [terms] if len(terms) <= 3 or rng.random() < 0.5 else [terms[:2], terms[2:]]
    out = []
    for g in groups:
        listed = g[0] if len(g) == 1 else (", ".join(g[:-1]) + (" or " if len(g) == 2 else ", or ") + g[-1])
        frames = ["No {}.", "There is no {}.", "No evidence of {}."]
        if len(g) == 1:
            frames.append("{} is not seen.")
        out.append(_cap(_pick(rng, frames).format(listed)))
    return out + extra


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """Write (findings_text, impression_text) for a study with these ground-truth findings.

    Pass the texts to :func:`llm_cxr.data.reports.format_report` for the full report. The
    phrasing, sentence order and pertinent negatives vary with ``rng``; what is said is
    always true of ``findings`` (see the module docstring for the exact contract).
    """
    present = {f.name for f in findings}
    devices = [f for f in findings if f.name in DEVICES]
    pathologies = [f for f in findings if f.name not in DEVICES]
    lung = [f for f in pathologies if f.name != "cardiomegaly"]

    sentences: list[str] = [_positive_sentence(f, rng) for f in devices]
    heart = next((f for f in pathologies if f.name == "cardiomegaly"), None)
    heart_sentence = _positive_sentence(heart, rng) if heart else _pick(rng, _HEART_NORMAL)
    lung_sentences = [_positive_sentence(f, rng) for f in lung]
    if not any(n in present for n in _LUNG_PATHOLOGIES) and rng.random() < 0.85:
        lung_sentences.append(_pick(rng, _LUNGS_CLEAR))
    absent = [n for n in _NEGATABLE if n not in present] + [n for n in ("nodule", "mass") if n not in present]
    negatives = _negatives(absent, rng)
    if rng.random() < 0.5:
        lung_sentences = [lung_sentences[i] for i in rng.permutation(len(lung_sentences))]
    body = [heart_sentence] + lung_sentences if rng.random() < 0.75 else lung_sentences + [heart_sentence]
    sentences += body + negatives
    if rng.random() < 0.3:
        sentences.append(_pick(rng, _BONES))
    return " ".join(sentences), _impression(pathologies, devices, absent, rng)


def _impression(pathologies: list[Finding], devices: list[Finding], absent: list[str],
                rng: np.random.Generator) -> str:
    items = [_render(_pick(rng, _IMPRESSION[f.name]), f) for f in pathologies]
    if not items:
        items = [_pick(rng, _NO_ACUTE)]
    elif len(items) == 1 and "edema" in absent and pathologies[0].name == "cardiomegaly" and rng.random() < 0.4:
        items = [items[0].rstrip(".") + " without pulmonary edema."]
    if devices and rng.random() < 0.4:
        items += [_render(_pick(rng, _IMPRESSION[f.name]), f) for f in devices]
    if len(items) > 1 and rng.random() < 0.4:
        return " ".join(f"{i + 1}. {s}" for i, s in enumerate(items))
    return " ".join(items)
