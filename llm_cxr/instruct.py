"""Instruction data: from a dataset with a ``codes`` column to tokenised examples and batches.

A stage (LLM-CXR trained two: findings + impression on every study, then impression only on
one study per patient with more VQA) turns each study into a few :class:`~llm_cxr.prompts.Example`
objects, which :func:`encode_example` turns into token ids. The response alone carries the
loss: ``n_prompt`` says where it starts. A report that does not fit the context is truncated;
an image never is (a cut image would teach the model to stop drawing half way).

Tokenisation runs through ``datasets.map`` (cached by fingerprint, ``num_proc`` workers), and
batches are grouped by length so that padding is not most of the compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from llm_cxr import prompts, tokens
from llm_cxr.data import labeler, labeler_rules
from llm_cxr.data.schema import FINDING_NAMES, findings_from_json
from llm_cxr.errors import ConfigError, DatasetError, InputError
from llm_cxr.pipeline import code_hash
from llm_cxr.prompts import (NAMES, PLAN_INDEX, PLAN_ITEMS, Example, ImageSlot, PromptTemplate, checklist_qa,
                             get_template, guide_items, image_prompt, make_vqa, plan_items, report_prompt,
                             report_text, stated_items, vqa_prompt)
from llm_cxr.tokens import ImageTokenMap

log = logging.getLogger(__name__)


@dataclass
class StageConfig:
    """What one training stage is made of. Counts are examples per study."""

    sections: str = "findings_impression"  # or "impression"
    report: int = 1  # CXR -> report examples per study
    image: int = 1  # report -> CXR examples per study
    image_guided: int = 0  # report -> CXR examples whose prompt also lists the findings the report states, with
    #                        their sides (inference: what the labeler reads in the report, requested_findings)
    vqa: int = 2  # questions per study
    checklist: int = 0  # checklist examples per study (every finding answered yes/no in one response)
    report_guided: int = 0  # CXR -> report examples whose prompt also lists the findings present (the
    #                         checklist's positives); inference fills it from the run's reading (finding head
    #                         or the model's own checklist: LLMCXR.read_findings)
    report_from_findings: int = 0  # text-only examples: the same findings list, no image -> the report. Cheap
    #                                (no image tokens); teaches the writer to state the findings it is given
    vqa_guided: int = 0  # questions per study whose prompt also lists the findings present, as a guided report's
    #                      does (inference: the run's reading); ``vqa`` keeps training the model's own reading
    vqa_from_findings: int = 0  # text-only guided questions: the findings list, no image -> the answer. Cheap;
    #                             teaches the model to answer presence (and, with guide_sides, side) questions
    #                             from the list it is given, as report_from_findings teaches the writer
    guide_sides: bool = False  # the guided prompt gives each finding's side ("right pleural effusion"), as the
    #                            run's finding head reads it (finding_head: conv)
    one_per_patient: bool = False  # stage 2: one study per patient
    instruct_jsonl: str | None = None  # plain instruction data (Dolly/Alpaca JSONL), mixed in
    instruct_ratio: float = 0.0  # plain examples per multimodal example
    repeats: int = 1  # variants per study (other paraphrases and questions)
    image_focus: float = 1.0  # weight of a drawn image's tokens in the grid cells that show a finding its prompt
    #                           lists (image_guided; from the dataset's masks, which the synthetic set has), against
    #                           1 for its other tokens; 1 = off. A nodule touches 2 of 256 cells, so unweighted it is
    #                           ~1% of its drawing's loss

    def __post_init__(self) -> None:
        if self.sections not in ("findings_impression", "impression"):
            raise ConfigError(f"stage.sections must be 'findings_impression' or 'impression', got {self.sections!r}")
        for k in ("report", "image", "image_guided", "vqa", "checklist", "report_guided", "report_from_findings",
                  "vqa_guided", "vqa_from_findings", "repeats"):
            if getattr(self, k) < 0:
                raise ConfigError(f"stage.{k} must be >= 0, got {getattr(self, k)}")
        counts = (self.report, self.image, self.image_guided, self.vqa, self.checklist, self.report_guided,
                  self.report_from_findings, self.vqa_guided, self.vqa_from_findings)
        if sum(counts) == 0 and not self.instruct_jsonl:
            raise ConfigError("stage makes no examples: report, report_guided, report_from_findings, image, "
                              "image_guided, vqa, vqa_guided, vqa_from_findings and checklist are all 0 and no "
                              "instruct_jsonl")
        if not self.image_focus > 0:
            raise ConfigError(f"stage.image_focus must be > 0 (1 = off), got {self.image_focus}")
        if self.instruct_ratio < 0 or (self.instruct_ratio > 0 and not self.instruct_jsonl):
            raise ConfigError("stage.instruct_ratio > 0 needs stage.instruct_jsonl")


def _rng(seed: int, *keys) -> random.Random:
    h = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def study_examples(row: dict, stage: StageConfig, template: PromptTemplate, seed: int, repeat: int = 0) -> list[Example]:
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
            out.append(Example("vqa", vqa_prompt(template, qa.question, present), qa.answer, codes,
                               {"kind": qa.kind, "finding": qa.finding, "guided": True}))
        for _ in range(stage.checklist):
            qa = checklist_qa(findings, rng, askable, uncertain)
            out.append(Example("vqa", vqa_prompt(template, qa.question), qa.answer, codes, {"kind": qa.kind}))
        for qa in list_questions(findings, rng, stage.vqa_from_findings, askable, uncertain, stage.guide_sides):
            out.append(Example("text", vqa_prompt(template, qa.question, present, image=False), qa.answer, None,
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


def checklist_scope(row: dict) -> tuple[list, tuple[str, ...], tuple[str, ...]]:
    """(findings, askable, uncertain) of a study: on synthetic data every finding the generator draws is
    askable; on real data only what the labeler could read, never a hedged finding."""
    findings = findings_from_json(row.get("findings") or "[]")
    if row.get("source", "synthetic") == "synthetic":
        return findings, FINDING_NAMES, ()
    labels = row.get("labels") or {}
    return (findings, tuple(n for n in NAMES if labels.get(n) in (0, 1)),
            tuple(n for n, v in labels.items() if v == -1))


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


# --------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # tokens before the response; only the response carries the loss
    truncated: bool = False


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def image_span(token_map: ImageTokenMap, codes: Sequence[int]) -> list[int]:
    codes = np.asarray(codes).reshape(-1)
    if codes.size != token_map.tokens_per_image:
        raise InputError(f"an image needs {token_map.tokens_per_image} codes ({token_map.grid_size}x"
                         f"{token_map.grid_size}) for this model; got {codes.size}")
    return [token_map.begin_id, *token_map.codes_to_ids(torch.as_tensor(codes)).tolist(), token_map.end_id]


def encode_prompt(tokenizer, token_map: ImageTokenMap, parts: Sequence, codes: Sequence[int] | None = None,
                  max_text: int | None = None) -> tuple[list[int], bool]:
    """Prompt parts -> ids. The report (the second of three or more parts: instruction, report, ..., response key)
    may be cut to ``max_text`` tokens; a findings list after it never is."""
    ids: list[int] = []
    truncated = False
    for i, part in enumerate(parts):
        if isinstance(part, ImageSlot):
            if codes is None:
                raise InputError("this prompt has an image slot but no image codes were given")
            ids += image_span(token_map, codes)
            continue
        piece = _text_ids(tokenizer, part)
        if max_text is not None and i == 1 and len(parts) > 2 and len(piece) > max_text:
            piece, truncated = piece[:max_text], True
        ids += piece
    return ids, truncated


def image_prompt_ids(tokenizer, token_map: ImageTokenMap, template: PromptTemplate, parts: Sequence,
                     max_length: int) -> tuple[list[int], bool]:
    """Ids of a report -> image prompt that leaves room in ``max_length`` for the whole image response (image span,
    end key, EOS), and whether its report was cut for that. Training and generation cut a report alike."""
    room = max_length - (token_map.tokens_per_image + 2) - len(_text_ids(tokenizer, template.end_key)) - 1
    prompt, _ = encode_prompt(tokenizer, token_map, parts)
    over = len(prompt) - room
    if over <= 0:
        return prompt, False
    report_len = len(_text_ids(tokenizer, parts[1])) if len(parts) > 2 else 0
    if report_len - over < 8:
        raise InputError(f"max_length={max_length} cannot hold an image ({token_map.tokens_per_image} tokens) "
                         f"and its prompt; raise max_length")
    return encode_prompt(tokenizer, token_map, parts, max_text=report_len - over)[0], True


def encode_example(ex: Example, tokenizer, token_map: ImageTokenMap, template: PromptTemplate,
                   max_length: int) -> Encoded:
    """Token ids of a whole example (prompt, response, end key, EOS), fitted into ``max_length``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token: set tokenizer.eos_token before training")
    end = _text_ids(tokenizer, template.end_key) + [eos]
    if ex.response is None:  # report -> image: the image is the response and is never cut
        prompt, cut = image_prompt_ids(tokenizer, token_map, template, ex.prompt, max_length)
        return Encoded(prompt + image_span(token_map, ex.codes) + end, len(prompt), cut)
    prompt, _ = encode_prompt(tokenizer, token_map, ex.prompt, ex.codes)
    response = _text_ids(tokenizer, ex.response)
    room = max_length - len(prompt) - len(end)
    if room < 1:
        raise InputError(f"max_length={max_length} cannot hold the prompt of a {ex.task!r} example "
                         f"({len(prompt)} tokens); raise max_length")
    truncated = len(response) > room
    return Encoded(prompt + response[:room] + end, len(prompt), truncated)


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
                                  # a drawn image's plan (guide items, llm_cxr.prompts.PLAN_INDEX); [] for the rest
                                  "plan": datasets.List(datasets.Value("int16")),
                                  # a drawn image's grid cells that show its findings, and their loss weight
                                  "focus": datasets.List(datasets.Value("int16")),
                                  "focus_weight": datasets.Value("float32")})
    # datasets fingerprints fn by pickling it, which names the functions it calls but not their code: the source of
    # what makes the examples goes in too, or a cache made by older code would be reused silently
    code = code_hash(sys.modules[__name__], prompts, tokens, labeler, labeler_rules)
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


# --------------------------------------------------------------------------- batching


@dataclass
class LengthGroupedBatches:
    """Batches of similar length: shuffle, sort inside mega-batches of ``group`` batches, shuffle batches.

    ``rank``/``world`` shard the batch order so every process sees different, equally many batches.
    """

    lengths: Sequence[int]
    batch_size: int
    seed: int = 0
    group: int = 50
    rank: int = 0
    world: int = 1
    grouped: bool = True

    def epoch(self, epoch: int) -> list[list[int]]:
        g = np.random.default_rng(self.seed + 1000 * epoch)
        order = g.permutation(len(self.lengths))
        lengths = np.asarray(self.lengths)
        batches: list[list[int]] = []
        span = self.batch_size * self.group
        for s in range(0, len(order), span):
            chunk = order[s:s + span]
            if self.grouped:
                chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches[:1]
        g.shuffle(batches)
        usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
        return batches[self.rank:usable:self.world]

    def __len__(self) -> int:
        n = max(1, len(self.lengths) // self.batch_size)
        return max(1, n // self.world)


def collate(rows: list[dict], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and on padding (pad may equal EOS). Rows with a ``plan``
    (indices into :data:`llm_cxr.prompts.PLAN_ITEMS`) give a (B, items) multi-hot ``plan`` too, which is not a
    model input: the training loop hands it to the image plan (:func:`llm_cxr.imagepos.responses`). Rows with
    ``focus`` cells (``stage.image_focus``) give a (B, T) loss ``weights`` too, aligned with ``labels``."""
    longest = max(len(r["input_ids"]) for r in rows)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        x = torch.as_tensor(r["input_ids"], dtype=torch.long)
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
        labels[i, r["n_prompt"]:len(x)] = x[r["n_prompt"]:]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(r.get("focus") for r in rows):  # a drawn image's response is <image> + codes: cell k is token n_prompt+1+k
        weights = torch.ones((len(rows), T))
        for i, r in enumerate(rows):
            if r.get("focus"):
                weights[i, r["n_prompt"] + 1 + torch.as_tensor(r["focus"], dtype=torch.long)] = float(r["focus_weight"])
        out["weights"] = weights
    if any("plan" in r for r in rows):
        plan = torch.zeros((len(rows), len(PLAN_ITEMS)))
        for i, r in enumerate(rows):
            plan[i, list(r.get("plan") or [])] = 1.0
        out["plan"] = plan
    return out


def lengths_of(tok_ds) -> np.ndarray:
    return np.asarray(tok_ds.select_columns(["length"]).with_format("numpy")[:]["length"])


def iterate_batches(tok_ds, sampler: LengthGroupedBatches, pad_id: int, start_epoch: int = 0,
                    skip: int = 0, plan: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Endless (epoch, index in epoch, batch) stream; ``skip`` batches of ``start_epoch`` are passed over (resume).
    ``plan``: batches carry the drawn images' plans (see :func:`collate`)."""
    cols = ["input_ids", "n_prompt"] + (["plan"] if plan else [])
    cols += [c for c in ("focus", "focus_weight") if c in tok_ds.column_names]
    if plan and "plan" not in tok_ds.column_names:
        raise DatasetError("these tokenised examples have no 'plan' column (made by an older llm-cxr): tokenise again")
    data = tok_ds.select_columns(cols)
    epoch = start_epoch
    while True:
        for b, idx in enumerate(sampler.epoch(epoch)):
            if epoch == start_epoch and b < skip:
                continue
            batch = data[idx]
            yield epoch, b, collate([dict(zip(cols, r)) for r in zip(*(batch[c] for c in cols))], pad_id)
        epoch += 1
