"""The vocabulary of the report labeler, and the tools to check it against references.

The phrase lists are data; :mod:`llm_cxr.data.labeler` is the engine that applies
them. At the end: reference labels from the IU X-ray MeSH problem lists and per-class
agreement (precision / recall / F1) of two sets of labels.

The phrase lists follow the CheXpert labeler (Irvin et al., "CheXpert", AAAI 2019) and
NegBio (Peng et al., AMIA 2018 Informatics Summit): a mention is a phrase naming an
observation; its status comes from negation and uncertainty cues in the same clause.

Two kinds of mention:

* :class:`MentionRule` -- a phrase that names a finding outright ("pleural effusion",
  "cardiomegaly", "PICC line"). Its status is positive unless a cue says otherwise.
* :class:`AttributeRule` -- a structure whose state the sentence describes ("heart size is
  normal", "the mediastinum is widened", "costophrenic angles are sharp"). It counts only
  when a state word is found near it.

Deliberate choices (documented because a careful reader may disagree):

* Lung opacity (CheXpert's parent class) is implied by opacity, infiltrate, airspace
  disease, consolidation, atelectasis and pulmonary edema mentions, and by nodular
  opacities; not by scarring, granulomas, interstitial "markings" or vascular congestion.
* Pulmonary vascular congestion / prominence and heart failure count as edema (CheXpert's
  edema phrase list) but do not imply lung opacity.
* Support devices are tubes, lines, catheters, ports, drains, pacemakers/ICDs and their
  leads, prosthetic valves, monitoring leads, generic "devices" and, as in CheXpert's list,
  orthopaedic hardware (screws, plates, anchors, arthroplasties), cannulas and coils.
  Surgical clips, sternotomy wires and stents are not (CheXpert does not list them, and the
  IU annotators file them as surgical instruments and stents, not as medical devices).
* Heart size "at the upper limits of normal" / "top normal" is normal; "borderline" is
  uncertain.
* An enlarged cardiomediastinal silhouette is enlarged cardiomediastinum (positive) and
  only uncertain evidence of cardiomegaly.
* Blunting of a costophrenic angle alone is not read as pleural effusion (it is also
  scarring or pleural thickening); sharp or clear angles are read as no effusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from llm_cxr.data.schema import CHEXPERT_14, LABEL_NAMES, POSITIVE


@dataclass(frozen=True)
class MentionRule:
    """A phrase that names an observation; ``labels`` are the classes it speaks about."""

    labels: tuple[str, ...]
    pattern: str

    def __post_init__(self) -> None:
        unknown = [lab for lab in self.labels if lab not in LABEL_NAMES]
        if unknown:
            raise ValueError(f"MentionRule {self.pattern!r}: unknown labels {unknown}")


@dataclass(frozen=True)
class AttributeRule:
    """A structure whose described state decides the labels (``heart size is normal``).

    ``abnormal`` / ``normal`` / ``borderline`` are regexes for state words; the first one
    found after the subject (or the last one just before it) decides: abnormal -> positive,
    normal -> negative, borderline -> uncertain. Labels in ``capped`` are at most uncertain.
    """

    labels: tuple[str, ...]
    subject: str
    abnormal: str | None = None
    normal: str | None = None
    borderline: str | None = None
    capped: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = [lab for lab in self.labels + self.capped if lab not in LABEL_NAMES]
        if unknown:
            raise ValueError(f"AttributeRule {self.subject!r}: unknown labels {unknown}")
        if not (self.abnormal or self.normal or self.borderline):
            raise ValueError(f"AttributeRule {self.subject!r}: needs at least one state pattern")


def _alt(*parts: str) -> str:
    """One regex that matches any of ``parts``."""
    return "|".join(parts)


_DEV = "support_devices"
_OPA = "lung_opacity"
_M = MentionRule
# A mass or lesion named by a place outside the lung is no lung lesion.
_NOT_IN_LUNG = "".join(f"(?<!{w} )" for w in (
    "thyroid", "breast", "neck", "pleural", "pericardial", "cardiac", "mediastinal", "paratracheal",
    "chest wall", "soft tissue", "axillary", "abdominal", "paraspinal"))

# Order matters only where two phrases start at the same place: earlier rules win there.
MENTION_RULES: tuple[MentionRule, ...] = (
    # --- pleura ------------------------------------------------------------------------------
    _M(("pleural_effusion", "pneumothorax"), r"(?:hydro|hemo|haemo)pneumothora(?:x|ces)"),
    _M(("pneumothorax",), r"pneumothora(?:x|ces)|\bptx\b"),
    _M(("pleural_effusion",), _alt(
        r"(?:pleural )?(?<!pericardial )(?<!joint )effusions?",
        r"pleural fluid",
        r"fluid in the (?:pleural|\w+ fissure)",
        r"(?:hydro|hemo|haemo)thorax",
        r"empyema",
    )),
    _M(("pleural_other",), _alt(
        r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis|reaction)",
        r"thickening of the pleura",
        r"pleuro-?parenchymal (?:scarring|thickening|irregularit\w+)",
        r"fibrothorax",
        r"apical (?:pleural )?cap(?:s|ping)?",
        r"(?<!cystic )\bfibros[ie]s\b|\bfibrotic\b",
    )),
    # --- devices (before the lungs: a "chest tube" is nothing else) -----------------------------
    _M(("endotracheal_tube", _DEV), r"endotracheal(?: tube)?|\bet tube|\bett\b|\bet\b(?= tip)"),
    _M(("chest_tube", _DEV), _alt(
        r"chest tubes?",
        r"thoracostomy tubes?",
        r"pleural (?:drain(?:age)?|catheter|tube)(?: catheter)?s?",
        r"pigtail(?: catheter| drain)?s?",
        r"(?:chest|pleural) drains?",
    )),
    _M(("pacemaker", _DEV), _alt(
        r"pacemakers?|\bpacers?\b(?! pads?)|\ba?icds?\b|defibrillators?(?! pads?)",
        r"pacing (?:wires?|leads?|device)",
        r"(?:biventricular|dual[- ]chamber) (?:pacer|device)",
        r"cardiac (?:\w+ )?(?:generator|device)|\bgenerators?\b",
    )),
    _M(("central_line", _DEV), _alt(
        r"central (?:venous )?(?:line|catheter)s?|\bcvc\b|\bpicc\b(?: line)?s?",
        r"peripherally inserted central (?:venous )?catheter",
        r"port-?a-?cath|\b(?:medi|power|infusa)?ports?\b|perma-?caths?|vas-?caths?",
        r"(?:internal jugular|\bij\b|subclavian|jugular|femoral|brachiocephalic)\b[\w -]{0,25}?"
        r"\b(?:line|catheter|port)s?\b",
        r"(?:venous|(?:hemo)?dialysis|swan[- ]ganz|pulmonary artery|(?:triple|dual|double)[- ]lumen"
        r"|tunnel(?:l)?ed|indwelling|vascular) catheters?",
        r"\bcatheters?\b",
        r"(?:venous|arterial|dialysis|picc|central|swan[- ]ganz) lines?",
    )),
    _M((_DEV,), _alt(
        r"tracheostomy(?: tube)?|\btrach\b",
        r"(?:nasogastric|orogastric|feeding|enteric|gastric|dobb?hoff|\bng|\bog|gastrostomy"
        r"|nephrostomy|drainage) tubes?|\bngt\b",
        r"lines and tubes|tubes and lines|support (?:lines|devices)",
        r"(?:prosthetic|artificial|mechanical|bioprosthetic) (?:\w+ )?valves?",
        r"valve (?:replacement|prosthes[ie]s)",
        r"(?:ekg|ecg|monitor(?:ing)?|telemetry|electrocardiogram) "
        r"(?:leads?|wires?|electrodes?|devices?)",
        r"\bleads?\b(?! to)|\bdevices?\b|stimulators?|occluders?",
        # "... tip projects over the SVC": the tip of some tube or line
        r"\btip (?=(?:\w+ )?(?:project|overl|terminat|in |at |is |near |approximat|extend|lies"
        r"|lying|reach))",
    )),
    # More of CheXpert's support devices: orthopaedic hardware, cannulas, coils, and other
    # devices named by type. "Plate-like atelectasis" and vertebral end plates are not plates.
    _M((_DEV,), _alt(
        r"\bhardware\b|arthroplast(?:y|ies)|\bscrews?\b|(?:bone|suture) anchors?",
        r"(?<!end )(?<!growth )\bplates?\b(?![- ]?like)(?! (?:of )?(?:\w+ )?atelecta)",
        r"(?:humeral|shoulder|hip|knee|joint) (?:head )?(?:prosthes[ie]s|replacements?)",
        r"\bcannula(?:e|s)?\b|\becmo\b|\bcoils?\b|(?:ivc|vena cava|caval) filters?",
        r"(?:intra-?aortic )?balloon pump|\biabp\b|loop recorders?",
        r"(?:ventriculoperitoneal|ventriculoatrial|\bvp) shunt(?: tubing| catheter)?s?"
        r"|shunt (?:tubing|catheter)s?",
        r"(?:pacing|pacer|defibrillator|defib) pads?",
    )),
    # --- heart and mediastinum -----------------------------------------------------------------
    _M(("cardiomegaly",),
       r"cardiomegaly|cardiac enlargement|enlargement of the (?:heart|cardiac \w+)"),
    _M(("enlarged_cardiomediastinum",), _alt(
        r"widen(?:ed|ing) (?:of the )?(?:superior )?mediastin(?:um|al \w+)",
        r"mediastinal (?:widening|enlargement)|cardiomediastinal enlargement",
    )),
    # --- edema (before opacity) ---------------------------------------------------------------
    _M(("edema", _OPA), r"(?<!soft tissue )(?<!laryngeal )(?<!subcutaneous )\bedema(?:tous)?\b"),
    _M(("edema",), _alt(
        r"(?:vascular|venous|pulmonary) (?:congestion|engorgement|prominence|indistinctness"
        r"|redistribution)",
        r"(?:congestive )?(?:heart|cardiac) failure|\bchf\b|(?:fluid|volume) overload",
        r"cephalization|kerley|engorged (?:pulmonary )?vessels",
    )),
    # --- parenchyma ---------------------------------------------------------------------------
    # Airspace (alveolar) disease is consolidation by definition (Fleischner glossary).
    _M(("consolidation", _OPA), _alt(
        r"consolidat(?:ion|ions|ive|ed|ing)",
        r"air[ -]?space (?:disease|process|opacit(?:y|ies)|filling)",
        r"alveolar (?:opacit(?:y|ies)|filling|infiltrates?)",
    )),
    _M(("atelectasis", _OPA), _alt(
        r"atelecta(?:sis|ses|tic)",
        r"(?:lobar|lobe|lung|segmental) collapse",
        r"collapsed? (?:of the )?(?:\w+ ){0,4}(?:lobes?|lungs?)\b",
    )),
    _M(("pneumonia",),
       r"(?:broncho)?pneumonias?|pneumonitis|infectio(?:n|us)(?: process)?|\bbronchiolitis\b"),
    _M(("nodule", "lung_lesion", _OPA), r"(?:fibro)?nodular (?:opacit(?:y|ies)|infiltrates?)"),
    _M(("nodule", "lung_lesion"), r"nodul(?:e|es|ar|arity)\b|micronodul\w+"),
    _M(("mass", "lung_lesion"), _NOT_IN_LUNG + r"\bmass(?:es)?\b(?! effect)"),
    _M(("lung_lesion",), _alt(
        r"\btumou?rs?\b|neoplasms?|carcinoma|malignan(?:cy|cies|t)|metasta(?:sis|ses|tic)",
        r"(?<!lytic )(?<!sclerotic )(?<!blastic )(?<!bone )(?<!osseous )(?<!bony )(?<!skin )"
        + _NOT_IN_LUNG + r"lesions?\b",
    )),
    _M((_OPA,), _alt(
        r"(?<!paratracheal )(?<!mediastinal )(?<!soft tissue )(?<!breast )(?<!nipple )"
        r"opaci(?:ty|ties|fication|fications|fied)",
        r"infiltrat(?:e|es|ion|ive)",
        r"ground[- ]glass|(?:airspace|parenchymal|alveolar) densit(?:y|ies)|haziness",
    )),
    # --- bones --------------------------------------------------------------------------------
    _M(("fracture",), r"fractur(?:e|es|ed)|\bfx\b"),
)

_SIZE_NORMAL = _alt(
    r"not (?:\w+ )?(?:enlarged|widened|increased|large|wide)",
    r"normal|within (?:the )?(?:\w+ )?limits|unremarkable|negative",
    r"no (?:enlargement|widening)",
    r"upper limits? of normal|top normal",
)

ATTRIBUTE_RULES: tuple[AttributeRule, ...] = (
    AttributeRule(
        ("enlarged_cardiomediastinum", "cardiomegaly"),
        _alt(r"cardio ?mediastinal (?:silhouettes?|contours?|size|shadow|structures)",
             r"cardiomediastinum|cardiopericardial silhouette",
             r"cardiac (?:and|,) mediastinal (?:contours?|silhouettes?)"),
        abnormal=r"(?:\w+ly )?enlarge(?:d|ment)|widen(?:ed|ing)|large|increased",
        normal=_SIZE_NORMAL,
        borderline=r"borderline|prominen(?:t|ce)",
        capped=("cardiomegaly",),
    ),
    AttributeRule(
        ("cardiomegaly",),
        _alt(r"heart(?! failure| border)(?: size| silhouette| shadow| contours?)?",
             r"cardiac (?:size|silhouettes?|shadow|contours?|diameter|dimensions?)"),
        abnormal=r"(?:\w+ly )?enlarge(?:d|ment)|\blarge\b|increased|cardiomegaly",
        normal=_SIZE_NORMAL,
        borderline=r"borderline|prominen(?:t|ce)",
    ),
    AttributeRule(
        ("enlarged_cardiomediastinum",),
        _alt(r"mediastinum",
             r"(?:superior )?mediastinal (?:contours?|silhouettes?|width|shadow|structures"
             r"|configuration)"),
        abnormal=r"(?:\w+ly )?widen(?:ed|ing)|enlarge(?:d|ment)|\bwide\b",
        normal=_SIZE_NORMAL,
        borderline=r"prominen(?:t|ce)|fullness",
    ),
    AttributeRule(
        ("edema",),
        # "indistinct vascular margins": CheXpert's edema phrase "indistinctness"
        _alt(r"(?:pulmonary |central )?vascula(?:rity|ture)|pulmonary vessels",
             r"vascular (?:markings|margins|margination|outlines)"),
        abnormal=_alt(r"engorged|congest(?:ed|ion)|prominen(?:t|ce)|increased",
                      r"accentuat(?:ed|ion)|indistinct|cephaliz\w+"),
        normal=_alt(r"not (?:\w+ )?(?:engorged|congested|prominent|increased)",
                    r"normal|within (?:the )?(?:\w+ )?limits|unremarkable"),
    ),
    AttributeRule(
        ("pleural_effusion",),
        r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i)|recess(?:es)?)|costophrenic",
        normal=r"clear|sharp|normal|preserved|free",
    ),
    AttributeRule(
        (_OPA,),
        r"\blungs?\b(?! (?:volumes?|bases?|apex|apices|zones?|fields?|nodules?|mass))",
        normal=r"\bclear\b",
    ),
)

# ---------------------------------------------------------------------------------------
# Cues. "pre" cues act on mentions after them (to the end of the clause), "post" cues on
# mentions before them (back to the previous comma or clause break).

# Hedged negations: negation words that in fact express doubt. Checked before negation.
HEDGE_PRE = _alt(
    r"(?:cannot|can ?not|can't|could not|couldn't|does not|not) (?:be )?"
    r"(?:entirely |completely |totally )?(?:exclude|excluded|rule out|ruled out)",
    r"difficult to (?:entirely )?exclude|not (?:entirely |completely )?excluded",
    r"question of|rule out|\br/o\b|evaluat(?:e|ion) for|eval for|assess(?:ment)? for",
    # what a test can show, not what this one shows: "CT is more sensitive for detecting nodules"
    r"sensitive (?:in|for|at) (?:detecting|(?:the )?detection of)",
)
HEDGE_POST = _alt(
    r"(?:cannot|can ?not|can't|could not|not) (?:be )?(?:entirely |completely |totally "
    r"|definitely )?(?:excluded|ruled out|exclude)",
    r"difficult to (?:entirely )?exclude|is not excluded",
)

# Phrases with a negation word that do not negate what follows.
PSEUDO_NEGATION = _alt(
    r"no (?:significant |appreciable |substantial |definite |major |marked |gross )?"
    r"(?:interval )?(?:change|increase|decrease|worsening|improvement|progression|difference)",
    r"not (?:only|significantly (?:changed|different))",
    r"without (?:significant |appreciable )?(?:interval )?(?:change|increase|decrease)",
)

NEGATION_PRE = _alt(
    r"\bno\b|\bnot\b|\bnor\b|\bwithout\b|\bnegative for\b|\bfree of\b|\bclear of\b",
    r"\babsence of\b|\babsent\b|\bresolution of\b|\bresolved\b|\bremoval of\b|\bremoved\b",
    r"\bno longer\b|\bnever\b|\bdenies\b",
    r"\bfails? to (?:show|demonstrate|reveal)\b|\bdoes not (?:show|demonstrate|reveal)\b",
)
NEGATION_POST = _alt(
    r"(?:is|are|was|were|has been|have been)? ?not (?:\w+ )?(?:seen|identified|visualized|visible"
    r"|present|demonstrated|appreciated|evident|noted|detected|observed|apparent|shown)",
    r"(?<!not )(?:(?:has|have|had) )?(?:since |now |interval(?:ly)? )?"
    r"(?:resolved|cleared|disappeared)",
    r"(?:has|have) been removed|(?:was|were|is|are) removed|(?:is|are|was|were) absent",
    r"no longer (?:seen|present|visible|visualized|evident|identified)",
    r"(?:is|are|appears?|remains?) (?:\w+ )?(?:normal|within (?:the )?(?:\w+ )?limits)",
    r"within (?:the )?limits of normal",
)

UNCERTAINTY_PRE = _alt(
    r"\bpossibl[ey]\b|\bprobabl[ey]\b|\blikely\b|\bunlikely\b|\bmay\b|\bmight\b|\bcould\b",
    r"\bsuspicio(?:us|n) (?:for|of)\b|\bsuspect(?:ed)?\b|\bconcern(?:ing)? (?:for|of)\b",
    r"\bquestionabl[ey]\b|\bquestioned\b|\bquestion\b|\bequivocal\b|\bindeterminate\b",
    r"\bborderline\b|\bsuggest(?:s|ed|ing|ive|ion)?(?: of)?\b|\bfavou?r(?:s|ed|ing)?\b",
    r"\bversus\b|\bvs\.?(?=\s)|\bdifferential\b|\bpresum(?:ed|ably|ptive)\b|\bperhaps\b",
    r"\beither\b|\bconsider(?:ed)?\b|\bnot (?:entirely |completely )?(?:certain|clear)\b",
    r"\buncertain\b",
)
UNCERTAINTY_POST = _alt(
    r"(?:is|are|may be|might be|could be) (?:also )?(?:possible|suspected|questioned|likely"
    r"|probable)",
    r"(?:may|might|could) (?:be )?(?:present|exist)",
    r"\bversus\b|\bvs\.?(?=\s)|\?",
)

# Where a cue's reach ends inside a sentence.
SCOPE_END = _alt(
    r";|:|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\bwhereas\b|\bwhile\b|\byet\b",
    r"\bapart from\b|\baside from\b|\bother than\b|\bwhich\b|\bwith the exception\b",
    r",\s*(?=(?:there|the|this|these|it|with)\b)",
    r"\band (?=(?:there|the|it)\b)",
)
# Where a negation's reach ends but doubt carries on: "no effusion, consistent with ..." vs
# "may be due to infection or heart failure".
NEGATION_END = _alt(
    r"\bconsistent with\b|\bcompatible with\b|\bin keeping with\b",
    r"\bsecondary to\b|\bdue to\b",
)

# ---------------------------------------------------------------------------------------
# Laterality, location and severity.

# "right atrium", "left ventricle", "right heart border" name anatomy, not a side.
_NOT_A_SIDE = r"(?! (?:atri|ventric|heart|hemidiaphragm))"
LATERALITY_CUES: tuple[tuple[str, str], ...] = (
    (_alt(r"(?:right|left) (?:greater|larger|more|worse) than (?:right|left)",
          r"\bbilateral(?:ly)?\b|\bbibasi?l?ar\b|\bbibasal\b|\bbiapical\b",
          r"\bboth (?:lungs?|sides|bases|hemithora(?:x|ces)|lower lobes|upper lobes|apices)\b"),
     "bilateral"),
    (r"\bright(?:-sided| sided)?\b" + _NOT_A_SIDE, "right"),
    (r"\bleft(?:-sided| sided)?\b" + _NOT_A_SIDE + r"|\blingula\w*", "left"),
)

LOCATION_CUES: tuple[tuple[str, str], ...] = (
    (r"(?P<side>right|left) (?P<lobe>upper|middle|lower) lobe", "{side} {lobe} lobe"),
    (r"\blingula\w*", "lingula"),
    (r"\bretrocardiac\b", "retrocardiac"),
    (r"\b(?:peri)?hilar\b|\bparahilar\b", "perihilar"),
    (r"\bapical\b|\bapex\b|\bapices\b|\bbiapical\b|\bupper (?:lung )?zones?\b", "apical"),
    (r"\bbas(?:al|ilar|e|es)\b|\bbibasi?l?ar\b|\bbibasal\b|\blower (?:lung )?zones?\b", "basal"),
    (r"\bmid ?(?:lung|zone)\w*\b", "mid lung"),
)

SEVERITY_CUES: tuple[tuple[str, str], ...] = (
    (r"\b(?:tiny|trace|minimal|small|smaller)\b", "small"),
    (r"\bmild(?:ly)?\b", "mild"),
    (r"\bmoderate(?:ly)?\b", "moderate"),
    (r"\b(?:large|larger|massive|extensive|big)\b", "large"),
    (r"\b(?:severe(?:ly)?|marked(?:ly)?)\b", "severe"),
)

SIZE_CUE = r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>mm|cm)\b"

# ---------------------------------------------------------------------------------------
# Reference labels from the IU X-ray collection's MeSH problem lists (Demner-Fushman et
# al., JAMIA 2016), for checking the labeler on real report language. Each MeSH entry is
# "Term/qualifier/qualifier..."; a class is positive when one of its terms is present (and
# for lung lesion, when a round lung opacity is: see IU_ROUND_LESION_TERMS).

IU_REFERENCE_TERMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),  # plus "Cardiac Shadow/enlarged", see iu_reference_labels
    "pleural_effusion": ("Pleural Effusion", "Hydropneumothorax", "Hemothorax", "Hemopneumothorax"),
    "pneumothorax": ("Pneumothorax", "Hydropneumothorax", "Hemopneumothorax"),
    "atelectasis": ("Pulmonary Atelectasis",),
    # CheXpert's edema phrases include vascular congestion and heart failure.
    "edema": ("Pulmonary Edema", "Pulmonary Congestion", "Heart Failure"),
    # Parenchymal opacity: the opacity terms and the opacity-type diseases. "Density" is left
    # out: the annotators use it for calcified granulomas, bones and soft tissue as well.
    "lung_opacity": ("Opacity", "Consolidation", "Infiltrate", "Airspace Disease", "Pneumonia",
                     "Pulmonary Atelectasis", "Pulmonary Edema"),
    # CheXpert's lung-lesion phrases include "cavitary lesion"; a round lung opacity counts too
    # (see IU_ROUND_LESION_TERMS). Granulomas are not lesions unless called nodules.
    "lung_lesion": ("Nodule", "Mass", "Cavitation"),
    # Clips, sutures, stents and foreign bodies are not support devices (the annotators list
    # sternotomy wires and clips as "Surgical Instruments", coronary stents as "Stents").
    "support_devices": ("Catheters, Indwelling", "Tube, Inserted", "Implanted Medical Device",
                        "Medical Device"),
}
# An "Opacity" entry with one of these qualifiers is not in the lung.
IU_NON_LUNG_QUALIFIERS = frozenset(
    {"ribs", "clavicle", "mediastinum", "heart", "pleura", "supracardiac", "paratracheal", "thorax",
     "spine", "breast", "abdomen", "shoulder", "thoracic vertebrae"}
)
# The annotators have no term for a nodular opacity: they write a lung "Opacity" or "Density"
# with the shape qualifier "round". A nodule is a rounded opacity (Fleischner glossary) and
# CheXpert's lung-lesion phrases include "nodular opacity / density", so such an entry is a
# lung lesion -- unless the same report codes a round calcification or granuloma (one of
# IU_GRANULOMA_TERMS qualified "round"): that is a calcified granuloma, which CheXpert leaves
# out of lung lesion ("calcified nodule").
IU_ROUND_LESION_TERMS = frozenset({"Opacity", "Density"})
IU_GRANULOMA_TERMS = frozenset({"Calcinosis", "Granuloma", "Calcified Granuloma"})


def iu_reference_labels(mesh: str) -> dict[str, int]:
    """0/1 reference labels for :data:`IU_REFERENCE_TERMS` from an IU ``MeSH`` cell."""
    out = {name: 0 for name in IU_REFERENCE_TERMS}
    entries = []
    for entry in mesh.split(";"):
        parts = [p.strip() for p in entry.split("/")]
        entries.append((parts[0], set(parts[1:])))
    round_granuloma = any(t in IU_GRANULOMA_TERMS and "round" in q for t, q in entries)
    for term, qualifiers in entries:
        if term == "Cardiac Shadow" and "enlarged" in qualifiers:
            out["cardiomegaly"] = 1
        if term in IU_ROUND_LESION_TERMS and {"lung", "round"} <= qualifiers and not round_granuloma:
            out["lung_lesion"] = 1
        for name, terms in IU_REFERENCE_TERMS.items():
            if term not in terms:
                continue
            if name == "lung_opacity" and term == "Opacity" and qualifiers & IU_NON_LUNG_QUALIFIERS:
                continue
            out[name] = 1
    return out


@dataclass
class LabelAgreement:
    """Per-class precision / recall / F1 of predicted against reference 0/1 labels."""

    per_class: dict[str, dict[str, float]]  # name -> precision, recall, f1, support, predicted
    macro_f1: float  # mean F1 over classes with reference or predicted positives
    micro_f1: float

    def to_dict(self) -> dict[str, Any]:
        return {"per_class": self.per_class, "macro_f1": self.macro_f1, "micro_f1": self.micro_f1}


def compare_labels(pred: Iterable[dict[str, int]], ref: Iterable[dict[str, int]],
                   classes: Iterable[str] = CHEXPERT_14) -> LabelAgreement:
    """Agreement of binary labels (1 = positive, anything else = not), class by class.

    This is the CheXpert-label F1 of report-generation papers when ``pred`` comes from
    generated reports and ``ref`` from the reference reports.
    """
    pred, ref, classes = list(pred), list(ref), list(classes)
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predicted label sets for {len(ref)} references")
    counts = {c: [0, 0, 0] for c in classes}  # tp, fp, fn
    for p, r in zip(pred, ref):
        for c in classes:
            yp, yr = p.get(c) == POSITIVE, r.get(c) == POSITIVE
            counts[c][0] += yp and yr
            counts[c][1] += yp and not yr
            counts[c][2] += yr and not yp
    per_class = {c: _prf(*counts[c]) for c in classes}
    scored = [v["f1"] for c, v in per_class.items() if sum(counts[c]) > 0]
    micro = _prf(*(sum(counts[c][i] for c in classes) for i in range(3)))
    return LabelAgreement(per_class, sum(scored) / len(scored) if scored else 0.0, micro["f1"])


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "support": tp + fn, "predicted": tp + fp}

