"""The vocabulary of the report labeler: mention phrases, negation and uncertainty cues.

Everything here is data; :mod:`llm_cxr.evaluation.labeler` is the engine that applies it.
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
  leads, prosthetic valves, monitoring leads and generic "devices"; surgical clips,
  sternotomy wires, stents and orthopaedic hardware are not.
* Heart size "at the upper limits of normal" / "top normal" is normal; "borderline" is
  uncertain.
* An enlarged cardiomediastinal silhouette is enlarged cardiomediastinum (positive) and
  only uncertain evidence of cardiomegaly.
* Blunting of a costophrenic angle alone is not read as pleural effusion (it is also
  scarring or pleural thickening); sharp or clear angles are read as no effusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_cxr.data.schema import LABEL_NAMES


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


_DEV = "support_devices"
_OPA = "lung_opacity"

# Order matters only where two phrases start at the same place: earlier rules win there.
MENTION_RULES: tuple[MentionRule, ...] = (
    # --- pleura --------------------------------------------------------------------------
    MentionRule(("pleural_effusion", "pneumothorax"), r"(?:hydro|hemo|haemo)pneumothora(?:x|ces)"),
    MentionRule(("pneumothorax",), r"pneumothora(?:x|ces)|\bptx\b"),
    MentionRule(("pleural_effusion",),
                r"(?:pleural )?(?<!pericardial )(?<!joint )effusions?|pleural fluid|fluid in the (?:pleural|\w+ fissure)"
                r"|(?:hydro|hemo|haemo)thorax|empyema"),
    MentionRule(("pleural_other",),
                r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis|reaction)"
                r"|thickening of the pleura|pleuro-?parenchymal (?:scarring|thickening|irregularit\w+)"
                r"|fibrothorax|apical (?:pleural )?cap(?:s|ping)?|(?<!cystic )\bfibros[ie]s\b|\bfibrotic\b"),
    # --- devices (before lungs: "chest tube" must not be read as anything else) ---------------
    MentionRule(("endotracheal_tube", _DEV),
                r"endotracheal(?: tube)?|\bet tube|\bett\b|\bet\b(?= tip)"),
    MentionRule(("chest_tube", _DEV),
                r"chest tubes?|thoracostomy tubes?|pleural (?:drain(?:age)?|catheter|tube)(?: catheter)?s?"
                r"|pigtail(?: catheter| drain)?s?|(?:chest|pleural) drains?"),
    MentionRule(("pacemaker", _DEV),
                r"pacemakers?|\bpacers?\b|\ba?icds?\b|defibrillators?|pacing (?:wires?|leads?|device)"
                r"|(?:biventricular|dual[- ]chamber) (?:pacer|device)|cardiac (?:\w+ )?(?:generator|device)|\bgenerators?\b"),
    MentionRule(("central_line", _DEV),
                r"central (?:venous )?(?:line|catheter)s?|\bcvc\b|\bpicc\b(?: line)?s?"
                r"|peripherally inserted central (?:venous )?catheter|port-?a-?cath|\b(?:medi|power)?port\b"
                r"|(?:internal jugular|\bij\b|subclavian|jugular|femoral|brachiocephalic)\b[\w -]{0,25}?"
                r"\b(?:line|catheter|port)s?\b"
                r"|(?:venous|(?:hemo)?dialysis|swan[- ]ganz|pulmonary artery|(?:triple|dual|double)[- ]lumen|"
                r"tunnel(?:l)?ed|indwelling|vascular) catheters?|\bcatheters?\b"
                r"|(?:venous|arterial|dialysis|picc|central|swan[- ]ganz) lines?"),
    MentionRule((_DEV,),
                r"tracheostomy(?: tube)?|\btrach\b|(?:nasogastric|orogastric|feeding|enteric|gastric|dobb?hoff"
                r"|\bng|\bog|gastrostomy|nephrostomy|drainage) tubes?|\bngt\b|\bog tube|\bng tube"
                r"|lines and tubes|tubes and lines|support (?:lines|devices)"
                r"|(?:prosthetic|artificial|mechanical|bioprosthetic) (?:\w+ )?valves?|valve (?:replacement|prosthes[ie]s)"
                r"|(?:ekg|ecg|monitor(?:ing)?|telemetry|electrocardiogram) (?:leads?|wires?|electrodes?|devices?)"
                r"|\bleads?\b(?! to)|\bdevices?\b|stimulators?|occluders?|\btip (?=(?:\w+ )?(?:project|overl|terminat|"
                r"in |at |is |near |approximat|extend|lies|lying|reach))"),
    # --- heart and mediastinum ---------------------------------------------------------------
    MentionRule(("cardiomegaly",), r"cardiomegaly|cardiac enlargement|enlargement of the (?:heart|cardiac \w+)"),
    MentionRule(("enlarged_cardiomediastinum",),
                r"widen(?:ed|ing) (?:of the )?(?:superior )?mediastin(?:um|al \w+)|mediastinal (?:widening|enlargement)"
                r"|widening of the (?:superior )?mediastinum|cardiomediastinal enlargement"),
    # --- edema (before opacity) -----------------------------------------------------------
    MentionRule(("edema", _OPA), r"(?<!soft tissue )(?<!laryngeal )(?<!subcutaneous )\bedema(?:tous)?\b"),
    MentionRule(("edema",),
                r"(?:vascular|venous|pulmonary) (?:congestion|engorgement|prominence|indistinctness|redistribution)"
                r"|congestive (?:heart|cardiac) failure|(?:heart|cardiac) failure|\bchf\b|(?:fluid|volume) overload"
                r"|cephalization|kerley|engorged (?:pulmonary )?vessels"),
    # --- parenchyma -----------------------------------------------------------------------
    # Airspace (alveolar) disease is consolidation by definition (Fleischner glossary).
    MentionRule(("consolidation", _OPA),
                r"consolidat(?:ion|ions|ive|ed|ing)|air[ -]?space (?:disease|process|opacit(?:y|ies)|filling)"
                r"|alveolar (?:opacit(?:y|ies)|filling|infiltrates?)"),
    MentionRule(("atelectasis", _OPA),
                r"atelecta(?:sis|ses|tic)|(?:lobar|lobe|lung|segmental) collapse|collapsed? (?:of the )?(?:\w+ ){0,4}(?:lobes?|lungs?)\b"),
    MentionRule(("pneumonia",),
                r"(?:broncho)?pneumonia[s]?|pneumonitis|infectio(?:n|us)(?: process)?|\bbronchiolitis\b"),
    MentionRule(("nodule", "lung_lesion", _OPA), r"nodular (?:opacit(?:y|ies)|infiltrates?)"),
    MentionRule(("nodule", "lung_lesion"), r"nodul(?:e|es|ar|arity)\b|micronodul\w+"),
    MentionRule(("mass", "lung_lesion"), r"(?<!thyroid )(?<!breast )(?<!neck )\bmass(?:es)?\b(?! effect)"),
    MentionRule(("lung_lesion",),
                r"\btumou?rs?\b|neoplasms?|carcinoma|malignan(?:cy|cies|t)|metasta(?:sis|ses|tic)"
                r"|(?<!lytic )(?<!sclerotic )(?<!blastic )(?<!bone )(?<!osseous )(?<!bony )(?<!skin )lesions?\b"),
    MentionRule((_OPA,),
                r"(?<!paratracheal )(?<!mediastinal )(?<!soft tissue )(?<!breast )(?<!nipple )"
                r"opaci(?:ty|ties|fication|fications|fied)|infiltrat(?:e|es|ion|ive)"
                r"|ground[- ]glass|(?:airspace|parenchymal|alveolar) densit(?:y|ies)"
                r"|haziness"),
    # --- bones ----------------------------------------------------------------------------
    MentionRule(("fracture",), r"fractur(?:e|es|ed)|\bfx\b"),
)

_SIZE_NORMAL = (
    r"not (?:\w+ )?(?:enlarged|widened|increased|large|wide)|normal|within (?:the )?(?:\w+ )?limits"
    r"|unremarkable|no (?:enlargement|widening)|negative|upper limits? of normal|top normal"
)

ATTRIBUTE_RULES: tuple[AttributeRule, ...] = (
    AttributeRule(
        ("enlarged_cardiomediastinum", "cardiomegaly"),
        r"cardio ?mediastinal (?:silhouettes?|contours?|size|shadow|structures)|cardiomediastinum"
        r"|cardiopericardial silhouette|cardiac (?:and|,) mediastinal (?:contours?|silhouettes?)",
        abnormal=r"(?:\w+ly )?enlarge(?:d|ment)|widen(?:ed|ing)|large|increased",
        normal=_SIZE_NORMAL,
        borderline=r"borderline|prominen(?:t|ce)",
        capped=("cardiomegaly",),
    ),
    AttributeRule(
        ("cardiomegaly",),
        r"heart(?! failure| border)(?: size| silhouette| shadow| contours?)?"
        r"|cardiac (?:size|silhouettes?|shadow|contours?|diameter|dimensions?)",
        abnormal=r"(?:\w+ly )?enlarge(?:d|ment)|\blarge\b|increased|cardiomegaly",
        normal=_SIZE_NORMAL,
        borderline=r"borderline|prominen(?:t|ce)",
    ),
    AttributeRule(
        ("enlarged_cardiomediastinum",),
        r"mediastinum|(?:superior )?mediastinal (?:contours?|silhouettes?|width|shadow|structures|configuration)",
        abnormal=r"(?:\w+ly )?widen(?:ed|ing)|enlarge(?:d|ment)|\bwide\b",
        normal=_SIZE_NORMAL,
        borderline=r"prominen(?:t|ce)|fullness",
    ),
    AttributeRule(
        ("edema",),
        r"(?:pulmonary |central )?vascula(?:rity|ture)|pulmonary vessels|vascular markings",
        abnormal=r"engorged|congest(?:ed|ion)|prominen(?:t|ce)|increased|accentuat(?:ed|ion)|indistinct|cephaliz\w+",
        normal=r"not (?:\w+ )?(?:engorged|congested|prominent|increased)|normal|within (?:the )?(?:\w+ )?limits"
        r"|unremarkable",
    ),
    AttributeRule(
        ("pleural_effusion",),
        r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i)|recess(?:es)?)|costophrenic",
        normal=r"clear|sharp|normal|preserved|free",
    ),
    AttributeRule((_OPA,), r"\blungs?\b(?! (?:volumes?|bases?|apex|apices|zones?|fields?|nodules?|mass))",
                  normal=r"\bclear\b"),
)

# ---------------------------------------------------------------------------------------
# Cues. "pre" cues act on mentions after them (to the end of the clause), "post" cues on
# mentions before them (back to the previous comma or clause break).

# Hedged negations: negation words that in fact express doubt. Checked before negation.
HEDGE_PRE = (
    r"(?:cannot|can ?not|can't|could not|couldn't|does not|not) (?:be )?(?:entirely |completely |totally )?"
    r"(?:exclude|excluded|rule out|ruled out)|difficult to (?:entirely )?exclude"
    r"|not (?:entirely |completely )?excluded|question of|rule out|\br/o\b|evaluate for|eval for|assess(?:ment)? for"
)
HEDGE_POST = (
    r"(?:cannot|can ?not|can't|could not|not) (?:be )?(?:entirely |completely |totally |definitely )?"
    r"(?:excluded|ruled out|exclude)|difficult to (?:entirely )?exclude|is not excluded"
)

# Phrases with a negation word that do not negate what follows.
PSEUDO_NEGATION = (
    r"no (?:significant |appreciable |substantial |definite |major |marked |gross )?(?:interval )?"
    r"(?:change|increase|decrease|worsening|improvement|progression|difference)"
    r"|not (?:only|significantly (?:changed|different))|no longer (?:present|seen|visible|visualized|evident|identified)"
    r"|without (?:significant |appreciable )?(?:interval )?(?:change|increase|decrease)"
)

NEGATION_PRE = (
    r"\bno\b|\bnot\b|\bnor\b|\bwithout\b|\bnegative for\b|\bfree of\b|\bclear of\b|\babsence of\b|\babsent\b"
    r"|\bresolution of\b|\bresolved\b|\bremoval of\b|\bremoved\b|\bno longer\b|\bnever\b|\bdenies\b"
    r"|\bfails? to (?:show|demonstrate|reveal)\b|\bdoes not (?:show|demonstrate|reveal)\b"
)
NEGATION_POST = (
    r"(?:is|are|was|were|has been|have been)? ?not (?:\w+ )?(?:seen|identified|visualized|visible|present|demonstrated"
    r"|appreciated|evident|noted|detected|observed|apparent|shown)"
    r"|(?<!not )(?:(?:has|have|had) )?(?:since |now |interval(?:ly)? )?(?:resolved|cleared|disappeared)"
    r"|(?:has|have) been removed|(?:was|were|is|are) removed|(?:is|are|was|were) absent"
    r"|no longer (?:seen|present|visible|visualized|evident|identified)"
    r"|(?:is|are|appears?|remains?) (?:\w+ )?(?:normal|within (?:the )?(?:\w+ )?limits)|within (?:the )?limits of normal"
)

UNCERTAINTY_PRE = (
    r"\bpossibl[ey]\b|\bprobabl[ey]\b|\blikely\b|\bunlikely\b|\bmay\b|\bmight\b|\bcould\b|\bsuspicio(?:us|n) (?:for|of)\b"
    r"|\bsuspect(?:ed)?\b|\bconcern(?:ing)? (?:for|of)\b|\bquestionabl[ey]\b|\bquestioned\b|\bequivocal\b"
    r"|\bindeterminate\b|\bborderline\b|\bsuggest(?:s|ed|ing|ive|ion)?(?: of)?\b|\bfavou?r(?:s|ed|ing)?\b|\bversus\b|\bvs\.?(?=\s)|\bdifferential\b"
    r"|\bpresum(?:ed|ably|ptive)\b|\bperhaps\b|\beither\b|\bconsider(?:ed)?\b"
    r"|\bnot (?:entirely |completely )?(?:certain|clear)\b|\buncertain\b|\bquestion\b"
)
UNCERTAINTY_POST = (
    r"(?:is|are|may be|might be|could be) (?:also )?(?:possible|suspected|questioned|likely|probable)"
    r"|(?:may|might|could) (?:be )?(?:present|exist)|\bversus\b|\bvs\.?(?=\s)|\?"
)

# Where a cue's reach ends inside a sentence.
SCOPE_END = (
    r";|:|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\bapart from\b|\baside from\b|\bother than\b"
    r"|\bwhich\b|\bwhereas\b|\bwhile\b|\byet\b|\bwith the exception\b|,\s*(?=(?:there|the|this|these|it|with)\b)"
    r"|\band (?=(?:there|the|it)\b)"
)
# Where a negation's reach ends but doubt carries on: "no effusion, consistent with ..." vs
# "may be due to infection or heart failure".
NEGATION_END = r"\bconsistent with\b|\bcompatible with\b|\bsecondary to\b|\bdue to\b|\bin keeping with\b"

# ---------------------------------------------------------------------------------------
# Laterality, location and severity.

LATERALITY_CUES: tuple[tuple[str, str], ...] = (
    (r"(?:right|left) (?:greater|larger|more|worse) than (?:right|left)|\bbilateral(?:ly)?\b|\bbibasi?l?ar\b"
     r"|\bbibasal\b|\bbiapical\b|\bboth (?:lungs?|sides|bases|hemithora(?:x|ces)|lower lobes|upper lobes|apices)\b"
     r"|\bbilaterally\b|\bbilateral(?:ly)?\b", "bilateral"),
    # "right atrium", "left ventricle", "right heart border" name anatomy, not a side.
    (r"\bright(?:-sided| sided)?\b(?! (?:atri|ventric|heart|hemidiaphragm))", "right"),
    (r"\bleft(?:-sided| sided)?\b(?! (?:atri|ventric|heart|hemidiaphragm))|\blingula\w*", "left"),
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
# "Term/qualifier/qualifier..."; a class is positive when one of its terms is present.

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
    "lung_lesion": ("Nodule", "Mass"),
    # Clips, sutures, stents and foreign bodies are not support devices.
    "support_devices": ("Catheters, Indwelling", "Tube, Inserted", "Implanted Medical Device", "Medical Device"),
}
# An "Opacity" entry with one of these qualifiers is not in the lung.
IU_NON_LUNG_QUALIFIERS = frozenset(
    {"ribs", "clavicle", "mediastinum", "heart", "pleura", "supracardiac", "paratracheal", "thorax", "spine",
     "breast", "abdomen", "shoulder", "thoracic vertebrae"}
)


def iu_reference_labels(mesh: str) -> dict[str, int]:
    """0/1 reference labels for :data:`IU_REFERENCE_TERMS` from an IU ``MeSH`` cell."""
    out = {name: 0 for name in IU_REFERENCE_TERMS}
    for entry in mesh.split(";"):
        parts = [p.strip() for p in entry.split("/")]
        term, qualifiers = parts[0], set(parts[1:])
        if term == "Cardiac Shadow" and "enlarged" in qualifiers:
            out["cardiomegaly"] = 1
        for name, terms in IU_REFERENCE_TERMS.items():
            if term not in terms:
                continue
            if name == "lung_opacity" and term == "Opacity" and qualifiers & IU_NON_LUNG_QUALIFIERS:
                continue
            out[name] = 1
    return out
