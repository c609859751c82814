"""Typed configs of training: the stage's example mix, the loop, a multimodal stage, base pretraining.

A YAML file gives the keys of :class:`LMTrainConfig` (nested ``stage``/``lora``/``loop``); unknown keys and
wrong types are a :class:`~llm_cxr.errors.ConfigError` naming the key. Presets ship as package data
(:mod:`llm_cxr.train.presets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_cxr.configs import from_dict_strict, option, read_yaml_config
from llm_cxr.errors import ConfigError
from llm_cxr.train.lora import LoraSettings


@dataclass
class StageConfig:
    """What one training stage is made of. Counts are examples per study."""

    sections: str = option("findings_impression", help='the report sections a stage trains on: '
                                                       '"findings_impression" or "impression"')
    report: int = option(1, help='CXR -> report examples per study')
    image: int = option(1, help='report -> CXR examples per study')
    image_guided: int = option(0, help='report -> CXR examples whose prompt also lists the findings the report '
                                       'states, with their sides (inference: what the labeler reads in the report, '
                                       'requested_findings)')
    vqa: int = option(2, help='questions per study')
    checklist: int = option(0, help='checklist examples per study (every finding answered yes/no in one response)')
    report_guided: int = option(0, help='CXR -> report examples whose prompt also lists the findings present (the '
                                        "checklist's positives); inference fills it from the run's reading (finding "
                                        "head or the model's own checklist: LLMCXR.read_findings)")
    report_from_findings: int = option(0, help='text-only examples: the same findings list, no image -> the report. '
                                               'Cheap (no image tokens); teaches the writer to state the findings it '
                                               'is given')
    vqa_guided: int = option(0, help='questions per study whose prompt also lists the findings present, as a guided '
                                     "report's does (inference: the run's reading); ``vqa`` keeps training the "
                                     "model's own reading")
    vqa_from_findings: int = option(0, help='text-only guided questions: the findings list, no image -> the answer. '
                                            'Cheap; teaches the model to answer presence (and, with guide_sides, '
                                            'side) questions from the list it is given, as report_from_findings '
                                            'teaches the writer')
    vqa_focus: bool = option(False, help='a guided question\'s prompt ends with what the list says about the finding '
                                         'the question names ("Stated: right pleural effusion" or "Stated: no '
                                         'pleural effusion"), so the answer is read from the line before it, not '
                                         'looked up in the list (llm_cxr.lm.prompts.vqa_prompt). A stage inherits it')
    guide_sides: bool = option(False, help='the guided prompt gives each finding\'s side ("right pleural effusion"), '
                                           "as the run's finding head reads it (finding_head: conv)")
    one_per_patient: bool = option(False, help='stage 2: one study per patient')
    instruct_jsonl: str | None = option(None, help='plain instruction data (Dolly/Alpaca JSONL), mixed in')
    instruct_ratio: float = option(0.0, help='plain examples per multimodal example')
    repeats: int = option(1, help='variants per study (other paraphrases and questions)')
    image_focus: float = option(1.0, help="weight of a drawn image's tokens in the grid cells that show a finding its"
                                          " prompt lists (image_guided; from the dataset's masks, which the synthetic"
                                          ' set has), against 1 for its other tokens; 1 = off. A nodule touches 2 of '
                                          "256 cells, so unweighted it is ~1% of its drawing's loss")

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


@dataclass
class LoopConfig:
    """The training loop of a stage (``loop:``) or of base pretraining."""

    steps: int = option(1000, help='optimizer steps')
    batch_size: int = option(16, help='sequences per step and process')
    grad_accum: int = option(1, help='micro-batches per optimizer step')
    lr: float = option(3e-4, help='peak learning rate (AdamW, linear warmup, cosine decay)')
    warmup_steps: int = option(50, help='linear warmup steps')
    min_lr_ratio: float = option(0.1, help='cosine decay ends at lr * min_lr_ratio')
    weight_decay: float = option(0.0, help='AdamW weight decay on matrices (never on biases and norms)')
    max_grad_norm: float = option(1.0, help='gradient clipping; 0 = off')
    mixed_precision: str = option("bf16", help='"no" | "bf16" | "fp16"')
    gradient_checkpointing: bool = option(False, help='recompute activations in the backward pass (less memory)')
    group_by_length: bool = option(True, help='batch examples of similar length, so padding is not most of the '
                                              'compute')
    loss: str = option("token", help='"token": the mean over the batch\'s response tokens (a 258-token image outweighs'
                                     ' a one-word answer 258 to 1); "example": each example\'s response tokens '
                                     'averaged first, so every example weighs the same')
    max_minutes: float | None = option(None, help='stop (resumably) after this long')
    log_every: int = option(10, help='steps between metrics.csv rows')
    eval_every: int = option(200, help='steps between evaluations on the eval split; 0 = never')
    eval_batches: int = option(20, help='batches per evaluation and process')
    save_every: int = option(200, help='steps between checkpoints (a kill loses at most this many)')
    seed: int = option(0, help='seed of the batch order and of new weights')
    progress: bool = option(True, help='a progress bar (on a terminal)')

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch_size and grad_accum must be > 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("token", "example"):
            raise ConfigError(f"loop.loss must be 'token' or 'example', got {self.loss!r}")


# --------------------------------------------------------------------------- multimodal stages


@dataclass
class LMTrainConfig:
    """A multimodal training stage (``llm-cxr train --config YAML``)."""

    data: str = option(help='dataset with a `codes` column (`llm-cxr vqgan encode`)')
    out: str = option(help='run folder (rerun with the same one to resume); the model goes to OUT/model')
    base: str | None = option(None, help='hub name or folder of a causal LM (e.g. from `llm-cxr lm pretrain`)')
    init_from: str | None = option(None, help="a previous stage's run to continue (its adapter or weights)")
    stage: dict | StageConfig = option(default_factory=StageConfig, help='the example mix (``stage:`` keys)')
    lora: dict | LoraSettings | None = option(default_factory=LoraSettings, help='LoRA settings (``lora:`` keys); '
                                              'null with init_from continues the previous adapter as it is')
    full_finetune: bool = option(False, help='train every weight (what LLM-CXR did) instead of LoRA')
    image_init: str = option("mean", help='how new image-token rows start: "mean" of the text rows, or "codebook" '
                                          "(mean + a projection of the VQ-GAN's codebook, so similar codes start "
                                          'similar; needs the VQ-GAN the data was encoded with)')
    image_positions: str = option("2d", help='"2d": a learned table of H*W position embeddings added to image tokens '
                                             '(where a code sits in the grid; see llm_cxr/lm/addons), saved with the '
                                             'run; "none": the LM\'s own sequence positions only')
    image_reader: str = option("none", help='"conv": a small CNN over the codebook vectors of each prompt image adds '
                                            'local features to its tokens (llm_cxr/lm/addons: CodeReader), first '
                                            'trained for reader_pretrain_epochs as a finding classifier on the '
                                            "dataset's labels; needs image_positions: 2d and the VQ-GAN that encoded "
                                            'the data. "none": tokens only.')
    reader_pretrain_epochs: float = option(2.0, help="epochs of the image reader's pretraining as a finding "
                                                     'classifier')
    reader_summary: bool = option(True, help='the reader also adds a summary of the whole image (its features max-'
                                             'pooled over 3x2 regions) to the </image> token, where the text that '
                                             'follows finds it at one position')
    image_plan: bool = option(False, help='an image plan (llm_cxr/lm/addons: ImagePlan): for report -> image examples'
                                          ' that list their findings (stage.image_guided), a learned map per finding '
                                          'and side adds "draw it here" to the drawn image\'s tokens; generation gives'
                                          ' it the findings the report asks for. Needs image_positions: 2d. A stage '
                                          'inherits it.')
    finding_head: str = option("none", help='"conv": a finding classifier over the codes (llm_cxr/lm/addons/head.py),'
                                            ' trained for finding_head_epochs before the LM and frozen; a checklist-'
                                            "guided report's prompt then states what it reads, with sides. A stage "
                                            'inherits its init_from\'s head. "none": guided reports read the LM\'s own '
                                            'checklist answer.')
    finding_head_epochs: float = option(8.0, help='epochs of the finding head')
    finding_head_edits: float = option(0.0, help="share of each finding-head batch's images edited as an "
                                                 "explanation's deletion test edits them (cells away from findings, "
                                                 "or a whole finding, set to the image's commonest code; targets "
                                                 "follow the edit: llm_cxr/train/edits.py); needs the data's masks")
    image_temperature: float | None = option(None, help='the sampling temperature the run draws images with by '
                                                        'default (0: greedy), recorded in its run.json; null: the '
                                                        "init_from run's, else the library's (0.4)")
    image_guidance: float | None = option(None, help='the classifier-free guidance scale the run draws images '
                                                     'with by default (1: off), recorded in its run.json; null: the '
                                                     "init_from run's, else 1")
    attn_implementation: str = option("auto", help='transformers\' attention kernel: "auto" (eager for bf16 on CPU, '
                                                   'where it is faster; SDPA elsewhere), or any name transformers '
                                                   'accepts ("sdpa", "eager", "flash_attention_2")')
    template: str = option("compact", help='prompt template: "compact" or "dolly" (llm_cxr/lm/prompts.py)')
    max_length: int = option(512, help='tokens per example; a report is cut to fit, an image never is')
    split: str = option("train", help='the dataset split to train on')
    eval_split: str = option("val", help='the split of the eval loss')
    num_proc: int = option(1, help='tokenisation workers')
    loop: dict | LoopConfig = option(default_factory=LoopConfig, help='the training loop (``loop:`` keys)')

    def __post_init__(self) -> None:
        if self.image_temperature is not None and not self.image_temperature >= 0:
            raise ConfigError(f"image_temperature must be >= 0 (0: greedy), got {self.image_temperature}")
        if self.image_guidance is not None and not self.image_guidance > 0:
            raise ConfigError(f"image_guidance must be > 0 (1: off), got {self.image_guidance}")
        if isinstance(self.stage, dict):
            self.stage = from_dict_strict(StageConfig, self.stage, "stage")
        if isinstance(self.loop, dict):
            self.loop = from_dict_strict(LoopConfig, self.loop, "loop")
        if isinstance(self.lora, dict):
            self.lora = from_dict_strict(LoraSettings, self.lora, "lora")
        if (self.base is None) == (self.init_from is None):
            raise ConfigError("give exactly one of base (a model to start from) and init_from (a previous stage run)")
        if self.image_positions not in ("2d", "none"):
            raise ConfigError(f"image_positions must be '2d' or 'none', got {self.image_positions!r}")
        if self.image_reader not in ("conv", "none"):
            raise ConfigError(f"image_reader must be 'conv' or 'none', got {self.image_reader!r}")
        if self.image_reader == "conv" and self.image_positions != "2d":
            raise ConfigError("image_reader: conv needs image_positions: 2d (the reader lives in the same wrapper)")
        if self.image_plan and self.image_positions != "2d":
            raise ConfigError("image_plan needs image_positions: 2d (the plan lives in the same wrapper)")
        if self.finding_head not in ("conv", "none"):
            raise ConfigError(f"finding_head must be 'conv' or 'none', got {self.finding_head!r}")
        if self.image_init not in ("mean", "codebook"):
            raise ConfigError(f"image_init must be 'mean' or 'codebook', got {self.image_init!r}")
        if not self.full_finetune and self.lora is None and self.init_from is None:
            raise ConfigError("lora is null and full_finetune is false: nothing would be trained")


def _merge(doc: dict, sets: dict) -> None:
    for k, v in sets.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            _merge(doc[k], v)
        else:
            doc[k] = v


PRESETS = Path(__file__).resolve().parent / "presets"  # package data: the demo, training/*.sh and the CLI read these


def available_presets() -> dict[str, list[int]]:
    """Preset name -> its stages, from the YAML files shipped with the package (``NAME_stageN.yaml``)."""
    out: dict[str, list[int]] = {}
    for f in sorted(PRESETS.glob("*_stage*.yaml")):
        name, _, stage = f.stem.rpartition("_stage")
        if stage.isdigit():
            out.setdefault(name, []).append(int(stage))
    return out


def preset_path(preset: str, stage: int) -> Path:
    """The YAML file of one stage of a shipped preset (``small``, stage 1), or a ConfigError listing them."""
    path = PRESETS / f"{preset}_stage{stage}.yaml"
    if not path.exists():
        have = "; ".join(f"{k}: stages {', '.join(map(str, v))}" for k, v in available_presets().items())
        raise ConfigError(f"there is no preset {preset!r} with a stage {stage} (presets: {have})")
    return path


def load_lm_config(path: str | Path | None, sets: dict | None = None, **overrides: Any) -> LMTrainConfig:
    """A YAML file (keys of :class:`LMTrainConfig`; nested ``stage``/``lora``/``loop``) plus overrides.

    ``overrides`` are top-level or loop keys (None = not given); ``sets`` is a nested dict
    merged last (``--set stage.vqa=4``).
    """
    doc: dict[str, Any] = read_yaml_config(path) if path else {}
    source = str(path) if path else "command line"
    loop_keys = {f for f in LoopConfig.__dataclass_fields__}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in loop_keys:
            doc.setdefault("loop", {})[k] = v
        else:
            doc[k] = v
    _merge(doc, sets or {})
    if overrides.get("base") and "init_from" in doc and not overrides.get("init_from"):
        doc.pop("init_from")
    if overrides.get("init_from") and "base" in doc and not overrides.get("base"):
        doc.pop("base")
    for k in ("data", "out"):
        if k not in doc:
            raise ConfigError(f"{source}: the training config needs {k!r}")
    return from_dict_strict(LMTrainConfig, doc, "training", source)


# --------------------------------------------------------------------------- the embedded base LM


@dataclass
class PretrainConfig:
    """Report-text pretraining of the embedded GPT-NeoX (``llm-cxr lm pretrain``)."""

    data: str = option(help='dataset with reports')
    out: str = option(help='run folder; the base model goes to OUT/model')
    preset: str = option("small", help='model size: "tiny" or "small" (llm_cxr/train/base.py)')
    split: str = option("train", help='the split whose reports it trains on')
    eval_split: str = option("val", help='the split of the eval loss')
    loop: dict | LoopConfig = option(default_factory=lambda: LoopConfig(steps=600, batch_size=32, lr=1e-3,
                                                                        warmup_steps=30, eval_every=200),
                                     help='the training loop (``loop:`` keys)')

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = from_dict_strict(LoopConfig, self.loop, "loop")


# --------------------------------------------------------------------------- the config reference


def _sections() -> list[tuple[str, type]]:
    from llm_cxr.train.lora import LoraSettings

    return [("", LMTrainConfig), ("stage.", StageConfig), ("lora.", LoraSettings), ("loop.", LoopConfig)]


def config_reference() -> str:
    """docs/configuration.md: every key of a stage config with its type, default and help, from the dataclasses."""
    from llm_cxr.configs import config_fields

    out = ["# Configuration reference", "",
           "Generated from the config dataclasses by `python scripts/config_reference.py`; do not edit by hand.",
           "A stage config is YAML (`llm-cxr train --config FILE`, or a shipped preset with",
           "`--preset NAME --stage N`); any key can be overridden with `--set KEY=VALUE` (dotted for nested keys:",
           "`--set stage.vqa=4`).", ""]
    for prefix, cls in _sections():
        out += [f"## `{prefix or 'top level'}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, typ, default, help_text in config_fields(cls):
            typ = typ.replace("|", "\\|")  # a pipe would end the table cell
            out.append(f"| `{prefix}{name}` | `{typ}` | `{default}` | {help_text.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def config_help_text(width: int = 100) -> str:
    """The same keys as plain text, for ``llm-cxr train --help``."""
    import textwrap

    from llm_cxr.configs import config_fields

    lines = ["config keys (YAML, or --set KEY=VALUE):"]
    for prefix, cls in _sections():
        for name, _, default, help_text in config_fields(cls):
            lines.append(f"  {prefix}{name} (default {default})")
            lines += textwrap.wrap(help_text, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
