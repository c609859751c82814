"""One multimodal training stage: start from a base LM or the previous stage, attach the add-ons the config asks
for, train, and save a run folder that inference loads (``llm-cxr train``)."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from llm_cxr.configs import run_versions
from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons.head import load_head
from llm_cxr.lm.addons.plan import ImagePlan
from llm_cxr.lm.addons.positions import attach, find
from llm_cxr.lm.addons.reader import CodeReader
from llm_cxr.lm.prompts import PLAN_ITEMS
from llm_cxr.lm.run import GuidedModes, RunInfo, load_causal_lm, load_run, save_model, trainable_summary
from llm_cxr.lm.run import model_dir as run_model_dir
from llm_cxr.lm.tokens import add_image_tokens, init_image_rows_from_codebook
from llm_cxr.rng import seeded
from llm_cxr.train.addons import _codebook, _prepare_finding_head, _pretrain_reader
from llm_cxr.train.config import LMTrainConfig, StageConfig
from llm_cxr.train.examples import build_stage_dataset
from llm_cxr.train.loop import CHECKPOINT, train_loop
from llm_cxr.train.lora import apply_lora, pick_attention

log = logging.getLogger(__name__)


def _start_model(cfg: LMTrainConfig, codes_info: dict, attn: str | None = None):
    """(model, tokenizer, token_map, kind, base, new reader): the base extended with image tokens, or the
    previous stage; with ``image_reader: conv`` a reader the run does not have yet is attached (untrained)
    and returned, so that the caller pretrains it; with ``image_plan`` an image plan (starting at zero)."""
    codebook = functools.partial(_codebook, codes_info, cfg.data)  # loaded only if needed, and then once
    model, tok, token_map, kind, base = _start_lm(cfg, codes_info, codebook, attn)
    reader = None
    if cfg.image_reader == "conv" and find(model).reader is None:
        with seeded(cfg.loop.seed):
            reader = CodeReader(codebook(), token_map.grid_size, find(model).pos.shape[1], summary=cfg.reader_summary)
        attach(model, token_map, reader=reader)
    wrapper = find(model)
    if cfg.image_plan and wrapper.plan is None:
        with seeded(cfg.loop.seed):
            plan = ImagePlan(PLAN_ITEMS, token_map.tokens_per_image, wrapper.pos.shape[1],
                             row_std=wrapper.text_row_std())
        attach(model, token_map, plan=plan)
    return model, tok, token_map, kind, base, reader


def _start_lm(cfg: LMTrainConfig, codes_info: dict, codebook, attn: str | None = None):
    if cfg.init_from:
        prev = load_run(cfg.init_from, trainable=True, attn_implementation=attn)
        prev.token_map.check_vqgan(codes_info["n_embed"], codes_info["grid_size"], codes_info["fingerprint"],
                                   source=f"the VQ-GAN of {cfg.data}", weights=codes_info.get("weights"))
        if prev.info.kind == "full":
            prev.model.requires_grad_(True)
        if cfg.image_positions == "2d" and find(prev.model) is None:
            attach(prev.model, prev.token_map)  # the previous stage had none: start the table here
        return prev.model, prev.tokenizer, prev.token_map, prev.info.kind, prev.info.base
    model, tok = load_causal_lm(cfg.base, attn_implementation=attn)
    token_map = add_image_tokens(tok, model, codes_info["n_embed"], codes_info["grid_size"],
                                 codes_info["fingerprint"], codes_info.get("weights"))
    if cfg.image_init == "codebook":
        init_image_rows_from_codebook(model, token_map, codebook(), seed=cfg.loop.seed)
    kind = "full" if cfg.full_finetune else "lora"
    if kind == "lora":
        model = apply_lora(model, token_map, cfg.lora)
    if cfg.image_positions == "2d":
        attach(model, token_map)  # after peft, so its embedding wrapper sits inside ours
    return model, tok, token_map, kind, cfg.base


def train_lm(cfg: LMTrainConfig, accelerator=None) -> Path:
    """Run (or resume) one multimodal stage; returns the run folder."""
    from llm_cxr.accel import make_accelerator
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.vqgan.encode import read_codes_info

    loop = cfg.loop
    accelerator = accelerator or make_accelerator(loop.mixed_precision)
    torch.manual_seed(loop.seed)  # the run's entry: dropout and batch order follow its seed
    codes_info = read_codes_info(cfg.data)
    run = Path(cfg.out)
    attn = pick_attention(cfg.attn_implementation, accelerator.device, loop.mixed_precision)
    model, tok, token_map, kind, base, new_reader = _start_model(cfg, codes_info, attn)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and context < cfg.max_length:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the model's context "
                          f"({model.config.max_position_embeddings})")
    summary = trainable_summary(model)
    _init_run(run, cfg, summary, accelerator)
    with accelerator.main_process_first():
        ds = load_dataset(cfg.data)
        train_rows = ds.filter(lambda s: s == cfg.split, input_columns="split")
        train = build_stage_dataset(train_rows, tok, token_map, cfg.stage, cfg.template, cfg.max_length, loop.seed,
                                    cfg.num_proc)
        ev_rows = ds.filter(lambda s: s == cfg.eval_split, input_columns="split")
        ev = build_stage_dataset(ev_rows, tok, token_map, cfg.stage, cfg.template, cfg.max_length, loop.seed + 1,
                                 cfg.num_proc) if len(ev_rows) else None
    if len(train) == 0:
        raise ConfigError(f"{cfg.data} has no rows in split {cfg.split!r}")
    if accelerator.is_main_process:  # the head is not part of the LM: one process trains it, the others never use it
        _prepare_finding_head(cfg, run, train_rows, ev_rows, codes_info, token_map.grid_size, accelerator.device,
                              loop.progress)
    if new_reader is not None and not (run / CHECKPOINT).exists():  # on resume the checkpoint restores it
        _pretrain_reader(model, token_map, cfg, train_rows, progress=loop.progress and accelerator.is_main_process)
    log.info("%s: %d training examples, %s", run, len(train), summary)
    pos = train_loop(model, train, ev, tok.pad_token_id, loop, run, accelerator, desc=f"train {run.name}",
                     token_map=token_map)
    if accelerator.is_main_process:
        vq = codes_info.get("model_path")
        prev = RunInfo.load(run_model_dir(cfg.init_from)) if cfg.init_from else None  # what a stage inherits

        def drawing(key: str):  # how it draws: the stage's own setting, else the one its init_from draws with
            own = getattr(cfg, key)
            return getattr(prev, key) if own is None and prev is not None else own

        info = RunInfo(kind=kind, base=_abs(base), vqgan=_abs(vq) if vq else None, template=cfg.template,
                       max_length=cfg.max_length, guided=_guided_modes(cfg.stage, prev.guided if prev else None),
                       image_temperature=drawing("image_temperature"), image_guidance=drawing("image_guidance"),
                       extra={"vqgan_weights": codes_info.get("weights"),
                              "trainable": asdict(summary) | {"share": summary.share},
                              **_relative_refs(run / "model", base, vq)})
        head = load_head(run)  # trained or inherited beside the LM (_prepare_finding_head)
        save_model(accelerator.unwrap_model(model), tok, token_map, info, run / "model",
                   addons=[head] if head is not None else [])
        if pos.step >= loop.steps:
            (run / "DONE").write_text(json.dumps({"steps": pos.step}) + "\n")
    accelerator.wait_for_everyone()
    return run


def _guided_modes(st: StageConfig, prev: GuidedModes | None) -> GuidedModes:
    """What the run does with a findings list: this stage trains a guided mode, or continues a stage (``prev``: its
    init_from's modes) that did and trains no plain form of it (plain reports, plain drawings; only guided
    questions)."""
    prev = prev or GuidedModes()
    reports = bool(st.report_guided or (not st.report and prev.reports))
    vqa = bool(st.vqa_guided or st.vqa_from_findings or (not st.vqa and prev.vqa))
    images = bool(st.image_guided or (not st.image and prev.images))
    if st.report_guided or st.vqa_guided or st.vqa_from_findings or st.image_guided:
        sides = st.guide_sides
    else:
        sides = prev.sides and (reports or vqa or images)
    # a stage that trains guided questions trains them in its own form; one that does not keeps its init's
    focus = st.vqa_focus if (st.vqa_guided or st.vqa_from_findings) else prev.vqa_focus and vqa
    return GuidedModes(reports, vqa, images, sides, focus)


def _relative_refs(model_folder: Path, base: str, vqgan: str | None) -> dict[str, str]:
    """Local base / VQ-GAN paths relative to the model folder, so a moved tree of runs still loads."""
    out = {}
    for key, ref in (("base_relative", base), ("vqgan_relative", vqgan)):
        if ref and Path(ref).exists():
            out[key] = os.path.relpath(Path(ref).resolve(), model_folder.resolve())
    return out


def _abs(ref: str) -> str:
    p = Path(ref)
    return str(p.resolve()) if p.exists() else ref


def _init_run(run: Path, cfg: LMTrainConfig, summary, accelerator) -> None:
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        resolved = asdict(cfg)
        saved = run / "config.json"
        if saved.exists() and (run / CHECKPOINT).exists():
            old = json.loads(saved.read_text())
            same = ("loop", "out")  # a run folder that was moved or copied still resumes
            if {k: v for k, v in old.items() if k not in same} != {k: v for k, v in resolved.items() if k not in same}:
                raise ConfigError(f"{run} holds a run with another config; resume with the same config or choose "
                                  f"a new --out")
        saved.write_text(json.dumps(resolved, indent=2) + "\n")
        (run / "versions.json").write_text(json.dumps(run_versions("transformers", "peft"), indent=2) + "\n")
        (run / "trainable.json").write_text(json.dumps({"trainable": summary.trainable, "total": summary.total,
                                                        "share": summary.share}, indent=2) + "\n")
    accelerator.wait_for_everyone()
