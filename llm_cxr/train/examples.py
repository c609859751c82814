"""Instruction data: from a dataset with a ``codes`` column to tokenised examples.

A stage (LLM-CXR trained two: findings + impression on every study, then impression only on one study per
patient with more VQA) turns each study into a few :class:`~llm_cxr.lm.prompts.Example` objects, which
:func:`llm_cxr.lm.sequence.encode_example` (the inference side's tokenisation) turns into token ids. The response
alone carries the loss: ``n_prompt`` says where it starts. A report that does not fit the context is truncated; an
image never is (a cut image would teach the model to stop drawing half way). Tokenisation runs through
``datasets.map``, cached by fingerprint and by the source of the code that makes the examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np

from llm_cxr.data import labeler, labeler_patterns, labeler_rules
from llm_cxr.errors import DatasetError, InputError
from llm_cxr.lm import prompts, sequence, tokens
from llm_cxr.lm.prompts import (
    PLAN_INDEX,
    Example,
    PromptTemplate,
    checklist_qa,
    checklist_scope,
    get_template,
    guide_items,
    image_prompt,
    make_vqa,
    plan_items,
    report_prompt,
    report_text,
    stated_items,
    vqa_prompt,
)
from llm_cxr.lm.sequence import encode_example
from llm_cxr.lm.tokens import ImageTokenMap
from llm_cxr.pipeline import code_hash
from llm_cxr.train.config import StageConfig

log = logging.getLogger(__name__)


def _rng(seed: int, *keys) -> random.Random:
    h = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def study_examples(row: dict, stage: StageConfig, template: PromptTemplate, seed: int,
                   repeat: int = 0) -> list[Example]:
    """The examples one study contributes to a stage (deterministic for ``seed``, ``repeat``)."""
    rng = _rng(seed, row["id"], repeat)
    codes = row["codes"]
    report = report_text(row["report"], stage.sections)
    out: list[Example] = []
    for _ in range(stage.report):
        out.append(Example("report", report_prompt(template, rng, stage.sections), report, codes))
    for _ in range(stage.image):
        out.append(Example("image", image_prompt(template, report, rng), None, codes))
    if (stage.vqa or stage.checklist or stage.report_guided or stage.report_from_findings or stage.vqa_guided
            or stage.vqa_from_findings or stage.image_guided):
        findings, askable, uncertain = checklist_scope(row)
        # the checklist's positives, in its order (what the model's checklist or finding head gives at inference)
        present = guide_items(findings, askable, uncertain, stage.guide_sides)
        # a guided prompt lists what its target text states: an impression that leaves out the chest tube,
        # trained under a prompt that lists it, would teach the writer to drop findings it is given
        plan = (stated_items(present, report)
                if stage.report_guided or stage.report_from_findings or stage.image_guided else [])
        for _ in range(stage.report_guided):
            out.append(Example("report", report_prompt(template, rng, stage.sections, plan), report, codes,
                               {"guided": True}))
        for _ in range(stage.report_from_findings):
            out.append(Example("text", report_prompt(template, rng, stage.sections, plan, image=False), report,
                               None, {"guided": True}))
        for qa in make_vqa(findings, rng, stage.vqa, askable, uncertain):
            out.append(Example("vqa", vqa_prompt(template, qa.question), qa.answer, codes,
                               {"kind": qa.kind, "finding": qa.finding}))
        for qa in make_vqa(findings, rng, stage.vqa_guided, askable, uncertain):
            out.append(Example("vqa", vqa_prompt(template, qa.question, present, focus=stage.vqa_focus), qa.answer,
                               codes,
                               {"kind": qa.kind, "finding": qa.finding, "guided": True}))
        for _ in range(stage.checklist):
            qa = checklist_qa(findings, rng, askable, uncertain)
            out.append(Example("vqa", vqa_prompt(template, qa.question), qa.answer, codes, {"kind": qa.kind}))
        for qa in list_questions(findings, rng, stage.vqa_from_findings, askable, uncertain, stage.guide_sides):
            out.append(Example("text", vqa_prompt(template, qa.question, present, image=False,
                                                  focus=stage.vqa_focus), qa.answer, None,
                               {"kind": qa.kind, "finding": qa.finding, "guided": True}))
        layout = plan_items(plan, report) if stage.image_guided else []  # the image plan's items, with zones
        for _ in range(stage.image_guided):
            out.append(Example("image", image_prompt(template, report, rng, plan), None, codes,
                               {"guided": True, "plan": layout}))
    return out


def list_questions(findings, rng: random.Random, n: int, askable, uncertain, sides: bool) -> list:
    """``n`` questions a findings list answers by itself: presence (balanced yes/no), and with ``sides`` the side;
    never severity (the list does not state it) or a finding the list leaves out (hedged, not askable)."""
    kinds = ("presence", "laterality") if sides else ("presence",)
    stated = set(askable) - set(uncertain)
    out: list = []
    while len(out) < n:  # a study has few distinct questions: later rounds reword them and draw other absent findings
        round_ = [qa for qa in make_vqa(findings, rng, 99, askable, uncertain)
                  if qa.kind in kinds and qa.finding in stated]
        if not round_:
            break
        out += round_
    return out[:n]


def text_example(item: dict, template: PromptTemplate) -> Example:
    """A plain instruction example (Dolly ``instruction/context/response`` or Alpaca ``instruction/input/output``)."""
    instruction = item.get("instruction")
    response = item.get("response", item.get("output"))
    if not isinstance(instruction, str) or not isinstance(response, str):
        raise InputError("needs string fields 'instruction' and 'response' (or 'output')")
    context = item.get("context", item.get("input")) or ""
    return Example("text", template.parts(instruction, [context] if context else []), response, None)


def read_instruct_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"instruction data {path} does not exist")
    items = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not a JSON object ({e.msg})") from e
    return items


def focus_slots(masks, names, grid: int) -> list[int]:
    """Cells of a ``grid`` x ``grid`` code grid (row-major, as the codes are) that a mask of any finding in
    ``names`` touches; ``masks`` as the dataset stores them (``[{"finding", "mask"}]``, 255 inside)."""
    hit = np.zeros((grid, grid), dtype=bool)
    for m in masks or ():
        if m.get("finding") not in names or m.get("mask") is None:
            continue
        a = np.asarray(m["mask"])
        if a.ndim == 3:
            a = a[..., 0]
        ys, xs = np.nonzero(a > 0)
        hit[ys * grid // a.shape[0], xs * grid // a.shape[1]] = True
    return np.flatnonzero(hit).tolist()


# --------------------------------------------------------------------------- datasets


def _one_per_patient(ds, seed: int):
    pids = ds["patient_id"]
    ids = ds["id"]
    best: dict[str, tuple[str, int]] = {}
    for i, (pid, sid) in enumerate(zip(pids, ids)):
        key = hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest()
        if pid not in best or key < best[pid][0]:
            best[pid] = (key, i)
    return ds.select(sorted(i for _, i in best.values()))


def build_stage_dataset(ds, tokenizer, token_map: ImageTokenMap, stage: StageConfig, template: str = "compact",
                        max_length: int = 512, seed: int = 0, num_proc: int | None = None, progress: bool = True):
    """Tokenised examples of one stage from a dataset with ``codes``: columns input_ids, n_prompt, length, task."""
    import datasets

    if "codes" not in ds.column_names:
        raise DatasetError("the dataset has no 'codes' column: run `llm-cxr vqgan encode` on it first")
    tpl = get_template(template)
    wants_focus = stage.image_focus != 1 and stage.image_guided > 0
    focus = wants_focus and "masks" in ds.column_names
    if wants_focus and not focus:
        log.warning("stage.image_focus=%s does nothing here: the dataset has no 'masks' column", stage.image_focus)
    keep = [c for c in ("id", "patient_id", "report", "findings", "labels", "codes", "source")
            + (("masks",) if focus else ()) if c in ds.column_names]
    ds = ds.select_columns(keep)
    if stage.one_per_patient:
        ds = _one_per_patient(ds, seed)

    def fn(batch, code_version):
        out = {"input_ids": [], "n_prompt": [], "length": [], "task": [], "truncated": [], "plan": [], "focus": [],
               "focus_weight": []}
        n = len(batch["id"])
        for i in range(n):
            row = {k: batch[k][i] for k in batch}
            for r in range(stage.repeats):
                for ex in study_examples(row, stage, tpl, seed, r):
                    enc = encode_example(ex, tokenizer, token_map, tpl, max_length)
                    out["input_ids"].append(enc.input_ids)
                    out["n_prompt"].append(enc.n_prompt)
                    out["length"].append(len(enc.input_ids))
                    out["task"].append(ex.task)
                    out["truncated"].append(enc.truncated)
                    out["plan"].append([PLAN_INDEX[i] for i in ex.meta.get("plan", ())])
                    cells = []
                    if focus and ex.response is None and ex.meta.get("plan"):
                        names = {prompts.split_item(i.partition("@")[0])[0] for i in ex.meta["plan"]}
                        cells = focus_slots(row["masks"], names, token_map.grid_size)
                    out["focus"].append(cells)
                    out["focus_weight"].append(stage.image_focus if cells else 1.0)
        return out

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "n_prompt": datasets.Value("int32"), "length": datasets.Value("int32"),
                                  "task": datasets.Value("string"), "truncated": datasets.Value("bool"),
                                  # a drawn image's plan (guide items, llm_cxr.lm.prompts.PLAN_INDEX); [] for the rest
                                  "plan": datasets.List(datasets.Value("int16")),
                                  # a drawn image's grid cells that show its findings, and their loss weight
                                  "focus": datasets.List(datasets.Value("int16")),
                                  "focus_weight": datasets.Value("float32")})
    # datasets fingerprints fn by pickling it, which names the functions it calls but not their code: the source of
    # what makes the examples goes in too, or a cache made by older code would be reused silently
    code = code_hash(sys.modules[__name__], prompts, sequence, tokens, labeler, labeler_patterns, labeler_rules)
    tok = ds.map(fn, batched=True, batch_size=256, remove_columns=ds.column_names, features=features,
                 fn_kwargs={"code_version": code},
                 num_proc=num_proc if num_proc and num_proc > 1 else None, desc=f"tokenising ({stage.sections})")
    if stage.instruct_jsonl and stage.instruct_ratio > 0:
        tok = datasets.concatenate_datasets([tok, _instruct_dataset(stage, tokenizer, token_map, tpl, max_length,
                                                                    len(tok), seed, features)])
    n_trunc = int(np.sum(tok.with_format("numpy")[:]["truncated"])) if len(tok) else 0
    if n_trunc:
        log.warning("%d of %d examples were longer than max_length=%d; their report text was truncated",
                    n_trunc, len(tok), max_length)
    return tok


def _instruct_dataset(stage, tokenizer, token_map, tpl, max_length, n_multimodal, seed, features):
    import datasets

    items = read_instruct_jsonl(stage.instruct_jsonl)
    if not items:
        raise InputError(f"{stage.instruct_jsonl} holds no examples")
    want = int(round(stage.instruct_ratio * n_multimodal))
    rng = random.Random(seed)
    rows = {"input_ids": [], "n_prompt": [], "length": [], "task": [], "truncated": [], "plan": [], "focus": [],
            "focus_weight": []}
    for k in range(want):
        item = items[rng.randrange(len(items))] if want > len(items) else items[k]
        try:
            enc = encode_example(text_example(item, tpl), tokenizer, token_map, tpl, max_length)
        except InputError as e:
            raise InputError(f"{stage.instruct_jsonl}: {e}") from e
        rows["input_ids"].append(enc.input_ids)
        rows["n_prompt"].append(enc.n_prompt)
        rows["length"].append(len(enc.input_ids))
        rows["task"].append("text")
        rows["truncated"].append(enc.truncated)
        rows["plan"].append([])
        rows["focus"].append([])
        rows["focus_weight"].append(1.0)
    return datasets.Dataset.from_dict(rows, features=features)
