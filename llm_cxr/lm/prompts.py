"""Instruction templates for every task, and visual questions made from structured findings.

Three tasks, as in LLM-CXR (Lee et al., ICLR 2024): CXR -> report, report -> CXR, and visual
question answering. A prompt is a list of *parts*: strings and :class:`ImageSlot` (the place
where an image's codes go), so the same description serves training (the response is known)
and inference (the response is generated). Templates follow the Dolly/Alpaca instruction
format; which template a run uses is part of its config.

VQA for synthetic data comes from the generator's structured findings (laterality, severity);
for real data from what the report labeler extracted. LLM-CXR never released its VQA data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from llm_cxr.data.labeler import label_report
from llm_cxr.data.reports import parse_sections
from llm_cxr.data.schema import DEVICES, FINDING_NAMES, LATERALITIES, Finding, findings_from_json
from llm_cxr.errors import ConfigError, InputError

TASKS = ("report", "image", "vqa")


@dataclass(frozen=True)
class ImageSlot:
    """Where an image's token span (``<image> <img_..>*H*W </image>``) goes in a prompt."""


IMAGE = ImageSlot()


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction format. ``{instruction}`` and ``{input}`` are filled; the response follows it."""

    name: str
    preamble: str
    instruction_key: str
    input_key: str
    response_key: str
    end_key: str  # text after the response; the tokenizer's EOS token always ends a sequence too

    def parts(self, instruction: str, inputs: Sequence[str | ImageSlot] = ()) -> list[str | ImageSlot]:
        """The prompt up to and including the response key: text parts and image slots.

        Each input stays its own part, so a report in the prompt can be truncated on its own
        and is tokenised the same way at training and inference time.
        """
        if not inputs:
            return [f"{self.preamble}{self.instruction_key}{instruction}", self.response_key]
        return [f"{self.preamble}{self.instruction_key}{instruction}{self.input_key}", *inputs, self.response_key]


TEMPLATES: dict[str, PromptTemplate] = {
    # LLM-CXR's (Dolly's) format, word for word: what a Dolly/Pythia checkpoint has seen.
    "dolly": PromptTemplate(
        name="dolly",
        preamble="Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n",
        instruction_key="### Instruction:\n", input_key="\n\nInput:\n", response_key="\n\n### Response:\n",
        end_key="\n\n### End"),
    # The same structure without the preamble: 30 fewer tokens per example for small models.
    "compact": PromptTemplate(name="compact", preamble="", instruction_key="### Instruction:\n",
                              input_key="\n### Input:\n", response_key="\n### Response:\n", end_key=""),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


REPORT_INSTRUCTIONS = (
    "Generate a free-text radiology report for the entered chest X-ray image.",
    "Write the radiology report for this chest radiograph.",
    "Describe the findings of this chest X-ray as a radiologist would.",
    "Read this chest X-ray and write its report.",
)
IMAGE_INSTRUCTIONS = (
    "Generate a chest X-ray image that corresponds to the entered free-text radiology report.",
    "Draw the chest radiograph this report describes.",
    "Create a chest X-ray image matching the following report.",
    "Synthesize a frontal chest X-ray consistent with this report.",
)
# Checklist-guided prompts (as in diagnosis-driven report generation, e.g. PromptMRG, Jin et al., AAAI 2024):
# the findings read from the image (by the run's finding head, or the model's own checklist answer) go into the
# prompt, so the free text states what the image was read to show instead of the most frequent report.
GUIDE_PREFIX = "\nChecklist findings: "
GUIDE_QUESTION = "\nQuestion: "  # a guided question is asked again after the list
GUIDE_FOCUS = "\nStated: "  # what the list says of the finding the question names (vqa_focus)
IMPRESSION_INSTRUCTIONS = (
    "Write the impression section of the radiology report for this chest X-ray.",
    "Summarize the most important findings of this chest radiograph.",
)

# How a finding is named in a question and in a list of findings.
NAMES: dict[str, str] = {
    "cardiomegaly": "cardiomegaly", "pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
    "consolidation": "consolidation", "nodule": "pulmonary nodule", "mass": "lung mass", "edema": "pulmonary edema",
    "atelectasis": "atelectasis", "endotracheal_tube": "endotracheal tube", "central_line": "central venous line",
    "chest_tube": "chest tube", "pacemaker": "pacemaker", "lung_opacity": "lung opacity",
    "lung_lesion": "lung lesion", "pneumonia": "pneumonia", "fracture": "fracture",
    "enlarged_cardiomediastinum": "enlarged cardiomediastinum", "pleural_other": "pleural thickening",
    "support_devices": "support device",
}
_ARTICLE = {"cardiomegaly": "", "edema": "", "atelectasis": "", "consolidation": "", "pneumothorax": "a ",
            "pneumonia": "", "lung_opacity": "a ", "enlarged_cardiomediastinum": "an "}
PRESENCE_QUESTIONS = ("Is there {a}{name}?", "Does this chest X-ray show {a}{name}?", "Is {a}{name} present?")
LATERALITY_QUESTIONS = ("Which side is the {name} on?", "On which side is the {name}?",
                        "Where is the {name}, left or right?")
SEVERITY_QUESTIONS = ("How severe is the {name}?", "What is the size of the {name}?")
DEVICE_QUESTIONS = ("Which support devices are present?", "What lines and tubes are seen?")
LIST_QUESTIONS = ("What abnormalities are seen in this chest X-ray?", "List the findings of this image.")
CHECKLIST_QUESTIONS = ("Answer yes or no for each finding on the checklist.",
                       "Go through the findings checklist for this chest X-ray.")
LATERALITY_ANSWERS = {"left": "left", "right": "right", "bilateral": "both sides"}
# Classes a presence question may ask about: on synthetic data every finding the generator draws.
DEFAULT_ASKABLE: tuple[str, ...] = FINDING_NAMES


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # "presence" | "laterality" | "severity" | "devices" | "list" | "checklist"
    finding: str | None = None


def _article(name: str) -> str:
    if name in _ARTICLE:
        return _ARTICLE[name]
    return "an " if NAMES.get(name, name)[0] in "aeiou" else "a "


def _join(names: list[str]) -> str:
    names = [_phrase(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _phrase(item: str) -> str:
    """``"pleural_effusion:right"`` -> ``"right pleural effusion"``; a bare name -> its plain name."""
    name, side = split_item(item)
    text = NAMES.get(name, name.replace("_", " "))
    return f"{side} {text}" if side else text


# Zones of a lung from top to bottom, and the zone of each location the report labeler reads that is not a lobe
# (llm_cxr.data.labeler_rules.LOCATION_CUES; a lobe's zone is in its name).
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
_LOCATION_ZONE = {"apical": "upper", "lingula": "middle", "perihilar": "middle", "mid lung": "middle",
                  "basal": "lower", "retrocardiac": "lower"}
_GUIDE_ITEMS = tuple(NAMES) + tuple(f"{n}:{s}" for n in NAMES for s in LATERALITIES)
# Every item an image plan (llm_cxr/lm/addons/plan.py: ImagePlan) can be given: each finding, bare and with each side,
# and each of those in each zone (``"nodule:right@upper"``). New items go at the end: a saved plan's items must stay
# a prefix of these (ImagePlan.grown).
PLAN_ITEMS: tuple[str, ...] = _GUIDE_ITEMS + tuple(f"{i}@{z}" for i in _GUIDE_ITEMS for z in ZONES)
PLAN_INDEX: dict[str, int] = {item: i for i, item in enumerate(PLAN_ITEMS)}


def location_zone(location: str | None) -> str | None:
    """The lung zone of a location the report labeler reads (``"right upper lobe"`` -> ``"upper"``,
    ``"basal"`` -> ``"lower"``), or None."""
    if not location:
        return None
    for zone in ZONES:
        if f"{zone} lobe" in location:
            return zone
    return _LOCATION_ZONE.get(location)


def plan_items(items: Iterable[str], text: str) -> list[str]:
    """An image plan's input for a drawing of the report ``text`` that shows ``items`` (guide items): the items,
    then each again with the lung zone the report places its finding in, where it does
    (``["nodule:right", "nodule:right@upper"]``). Where a finding lies within a lung the side alone cannot say,
    and nodules and masses vary most."""
    items = list(items)
    zones = {f.name: location_zone(f.location) for f in label_report(text).findings}
    return items + [f"{i}@{zones[n]}" for i in items if zones.get(n := split_item(i)[0])]


def split_item(item: str) -> tuple[str, str | None]:
    """A guide item ``"name"`` or ``"name:side"`` -> (name, side or None)."""
    name, _, side = item.partition(":")
    return name.strip(), (side.strip() or None)


def check_items(items: Iterable[str]) -> list[str]:
    """Guide items a user gave (``"pleural_effusion"``, ``"pleural_effusion:right"``), validated."""
    items = [str(i).strip() for i in items if str(i).strip()]
    bad_names = sorted({split_item(i)[0] for i in items} - set(NAMES))
    if bad_names:
        raise InputError(f"unknown finding names {bad_names}; known: {', '.join(NAMES)}")
    bad_sides = sorted({s for _, s in map(split_item, items) if s is not None and s not in LATERALITIES})
    if bad_sides:
        raise InputError(f"unknown sides {bad_sides} (write name:side, side one of {', '.join(LATERALITIES)})")
    return items


def guide_items(findings: Iterable[Finding], askable: Sequence[str] = DEFAULT_ASKABLE, uncertain: Iterable[str] = (),
                sides: bool = False) -> list[str]:
    """The checklist's positives in its order, as a guided report prompt states them: ``"pleural_effusion"``, or
    with ``sides`` ``"pleural_effusion:right"`` where the side is known (two of a kind on both sides: bilateral)."""
    findings = list(findings)
    found: dict[str, set[str]] = {}
    for f in findings:
        if f.laterality in LATERALITIES:
            on = ("left", "right") if f.laterality == "bilateral" else (f.laterality,)
            found.setdefault(f.name, set()).update(on)
    out = []
    for name, yes in checklist_items(findings, askable, uncertain):
        if not yes:
            continue
        s = found.get(name, set())
        side = "bilateral" if len(s) == 2 else next(iter(s), None)
        out.append(f"{name}:{side}" if sides and side else name)
    return out


def stated_items(items: Iterable[str], text: str) -> list[str]:
    """The guide items whose finding ``text`` states (the report labeler reads it as present or uncertain, as the
    clinical score counts it), in their order."""
    said = {f.name for f in label_report(text).findings}
    return [i for i in items if split_item(i)[0] in said]


def requested_findings(text: str) -> list[str]:
    """What a report asks an image to show, as guide items in checklist order: its positive (not hedged)
    findings, with their sides (``["pleural_effusion:right", "chest_tube"]``)."""
    return guide_items([f for f in label_report(text).findings if not f.extra.get("uncertain")], sides=True)


def make_vqa(findings: Iterable[Finding], rng: random.Random, n: int = 4, askable: Sequence[str] = DEFAULT_ASKABLE,
             uncertain: Iterable[str] = ()) -> list[QA]:
    """Up to ``n`` distinct questions about a study with known findings.

    Presence questions are balanced (as many "no" as "yes" where possible, for any ``n``); laterality and
    severity questions are asked about findings that have one; ``uncertain`` names are never
    asked about (real data: the report hedged).
    """
    findings = [f for f in findings if f.name in NAMES]
    present = {f.name: f for f in findings}
    skip = set(uncertain)
    absent = [a for a in askable if a not in present and a not in skip]
    pool: list[QA] = []
    for f in findings:
        name = NAMES[f.name]
        pool.append(QA(rng.choice(PRESENCE_QUESTIONS).format(a=_article(f.name), name=name), "yes", "presence", f.name))
        if f.laterality in LATERALITIES and f.name not in DEVICES:
            pool.append(QA(rng.choice(LATERALITY_QUESTIONS).format(name=name), LATERALITY_ANSWERS[f.laterality],
                           "laterality", f.name))
        if f.severity:
            pool.append(QA(rng.choice(SEVERITY_QUESTIONS).format(name=name), f.severity, "severity", f.name))
    rng.shuffle(pool)
    n_yes = sum(q.answer == "yes" for q in pool)
    negatives = [QA(rng.choice(PRESENCE_QUESTIONS).format(a=_article(a), name=NAMES[a]), "no", "presence", a)
                 for a in rng.sample(absent, min(len(absent), max(n_yes, 1)))]
    devices = sorted(f.name for f in findings if f.name in DEVICES)
    pathologies = sorted(f.name for f in findings if f.name not in DEVICES)
    extra = [QA(rng.choice(DEVICE_QUESTIONS), _join(devices) if devices else "none", "devices"),
             QA(rng.choice(LIST_QUESTIONS), _join(pathologies) if pathologies else "no acute abnormality", "list")]
    # Interleave "yes" questions, "no" questions and the other kinds, starting from a random one of the
    # three, so that presence answers stay balanced for any n (with n=1 a fixed start would always ask a
    # positive, and a model trained on one question per study would learn to answer "yes").
    groups = [[q for q in pool if q.kind == "presence"], negatives, [q for q in pool if q.kind != "presence"]]
    k = rng.randrange(3)
    ordered = _round_robin(groups[k:] + groups[:k]) + extra
    seen: set[str] = set()
    out = []
    for qa in ordered:
        if qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    return out[:n]


def checklist_qa(findings: Iterable[Finding], rng: random.Random, askable: Sequence[str] = DEFAULT_ASKABLE,
                 uncertain: Iterable[str] = ()) -> QA:
    """Every askable finding answered at once, in a fixed order: ``"cardiomegaly: no; pleural effusion: yes; ..."``.

    One example carries a label for every finding (a presence question carries one), so the image is
    read for all of them per pass over its 256 tokens; :func:`parse_checklist` reads an answer back.
    """
    items = [f"{NAMES[a]}: {'yes' if yes else 'no'}" for a, yes in checklist_items(findings, askable, uncertain)]
    return QA(rng.choice(CHECKLIST_QUESTIONS), "; ".join(items), "checklist")


def checklist_items(findings: Iterable[Finding], askable: Sequence[str] = DEFAULT_ASKABLE,
                    uncertain: Iterable[str] = ()) -> list[tuple[str, bool]]:
    """(finding, present) for every item of the checklist, in its order: askable, nameable, not hedged."""
    present = {f.name for f in findings}
    skip = set(uncertain)
    return [(a, a in present) for a in askable if a in NAMES and a not in skip]


def parse_checklist(text: str) -> dict[str, bool]:
    """A checklist answer -> {finding: present} for the items it states (unknown names are skipped)."""
    by_name = {v: k for k, v in NAMES.items()}
    out: dict[str, bool] = {}
    for item in text.split(";"):
        name, _, value = item.partition(":")
        key = by_name.get(name.strip().lower())
        if key is not None and value.strip().lower() in ("yes", "no"):
            out[key] = value.strip().lower() == "yes"
    return out


def _round_robin(lists: list[list]) -> list:
    out = []
    for i in range(max(map(len, lists))):
        for part in lists:
            out += part[i:i + 1]
    return out


def report_text(report: str, sections: str) -> str:
    """The part of a report a stage trains on: ``"findings_impression"`` (all of it) or ``"impression"``."""
    if sections == "findings_impression":
        return report.strip()
    if sections == "impression":
        parsed = parse_sections(report)
        return f"IMPRESSION: {parsed.impression}" if parsed.impression else report.strip()
    raise ConfigError(f"report sections must be 'findings_impression' or 'impression', got {sections!r}")


@dataclass
class Example:
    """One instruction example before tokenisation."""

    task: str  # "report" | "image" | "vqa" | "text"
    prompt: list  # text parts and IMAGE slots, ending with the response key
    response: str | None  # text response, or None when the response is the image
    codes: Sequence[int] | None = None  # the study's codes (the image in the prompt or the response)
    meta: dict = field(default_factory=dict)


def report_prompt(template: PromptTemplate, rng: random.Random | None = None, sections: str = "findings_impression",
                  findings: Iterable[str] | None = None, image: bool = True):
    """A CXR -> report prompt. ``findings`` (guide items, ``name`` or ``name:side``) makes it checklist-guided:
    the findings present are stated after the image (in training the truth the target text states, at inference
    the run's reading: :meth:`llm_cxr.lm.generation.LLMCXR.generate_report`). ``image=False``: the guided prompt
    without the image (text-only training of the writer)."""
    pool = IMPRESSION_INSTRUCTIONS if sections == "impression" else REPORT_INSTRUCTIONS
    inputs: list = [IMAGE] if image else []
    if findings is not None:
        inputs.append(_guide_line(findings))
    return template.parts(rng.choice(pool) if rng else pool[0], inputs)


def _guide_line(findings: Iterable[str]) -> str:
    findings = list(findings)
    return GUIDE_PREFIX + (_join(findings) if findings else "none")


def image_prompt(template: PromptTemplate, report: str, rng: random.Random | None = None,
                 findings: Iterable[str] | None = None):
    """A report -> CXR prompt. ``findings`` (guide items) makes it guided: the findings the report states, with
    their sides, listed after it (in training the truth the report states, at inference what the labeler reads
    in the report: :func:`requested_findings`)."""
    inputs = [report] + ([] if findings is None else [_guide_line(findings)])
    return template.parts(rng.choice(IMAGE_INSTRUCTIONS) if rng else IMAGE_INSTRUCTIONS[0], inputs)


def asked_finding(question: str) -> str | None:
    """The finding a question names (the longest of the names questions use, :data:`NAMES`, or the finding's own
    name with spaces), or None: "Is there a left pleural effusion?" -> ``"pleural_effusion"``."""
    q = " " + re.sub(r"[^a-z]+", " ", question.lower()) + " "
    hits = [(len(phrase), name) for name, text in NAMES.items()
            for phrase in {text, name.replace("_", " ")} if f" {phrase} " in q]
    return max(hits)[1] if hits else None


def focus_line(question: str, findings: Iterable[str]) -> str:
    """What the stated ``findings`` say of the finding ``question`` names: ``"\nStated: right pleural effusion"``,
    ``"\nStated: no pneumothorax"``; empty when the question names none (a list or device question)."""
    name = asked_finding(question)
    if name is None:
        return ""
    item = next((i for i in findings if split_item(i)[0] == name), None)
    return GUIDE_FOCUS + (_phrase(item) if item is not None else "no " + NAMES[name])


def vqa_prompt(template: PromptTemplate, question: str, findings: Iterable[str] | None = None, image: bool = True,
               focus: bool = False):
    """A question about the image; ``findings`` (guide items) makes it guided: they are stated after the image as in
    :func:`report_prompt` (the truth in training, the run's reading at inference), and the question again after
    them, so the answer is looked up next to the list with or without the 258 image tokens before it.
    ``focus``: then also what the list says of the finding the question names (:func:`focus_line`); a small LM
    trained for minutes looks a finding up in the list unreliably (the tiny preset followed it in 79% of presence
    questions), and copies the line before its answer easily.
    ``image=False``: the guided question without the image (text-only training)."""
    inputs: list = [IMAGE] if image else []
    if findings is not None:
        findings = list(findings)
        inputs.append(_guide_line(findings) + GUIDE_QUESTION + question + (focus_line(question, findings) if focus
                                                                            else ""))
    return template.parts(question, inputs)


def checklist_scope(row: dict) -> tuple[list, tuple[str, ...], tuple[str, ...]]:
    """(findings, askable, uncertain) of a study: on synthetic data every finding the generator draws is
    askable; on real data only what the labeler could read, never a hedged finding."""
    findings = findings_from_json(row.get("findings") or "[]")
    if row.get("source", "synthetic") == "synthetic":
        return findings, FINDING_NAMES, ()
    labels = row.get("labels") or {}
    return (findings, tuple(n for n in NAMES if labels.get(n) in (0, 1)),
            tuple(n for n, v in labels.items() if v == -1))
