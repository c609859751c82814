"""Reports from images, images from reports, answers to questions: constrained, batched decoding.

Decoding runs its own loop over the model's KV cache (left-padded batches, explicit position
ids), so that constraints are exact rather than hoped for:

* inside an image span only image tokens can be chosen, and exactly ``H*W`` of them are
  produced before ``</image>`` is appended: every request yields a decodable image (LLM-CXR's
  pipeline stopped on an end key and could return too few codes, or none);
* text never contains image or boundary tokens and stops at EOS;
* report -> image can use classifier-free guidance (Ho & Salimans, 2021): the logits of the
  report prompt are pushed away from those of the same prompt with an empty report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llm_cxr.accel import bf16_is_fast
from llm_cxr.configs import IMAGE_TEMPERATURE, IMAGE_TOP_P
from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.addons.positions import find
from llm_cxr.lm.model import CXRModel, cache_of
from llm_cxr.lm.prompts import (
    CHECKLIST_QUESTIONS,
    check_items,
    get_template,
    image_prompt,
    parse_checklist,
    plan_items,
    report_prompt,
    requested_findings,
    split_item,
    vqa_prompt,
)
from llm_cxr.lm.run import LoadedRun, load_run
from llm_cxr.lm.sequence import ImageInputs, encode_prompt, image_prompt_ids

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """How tokens are picked. ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"bad sampling settings: temperature={self.temperature} (>= 0), top_p={self.top_p} "
                              f"(0-1], top_k={self.top_k} (>= 0)")


@dataclass
class GeneratedImages:
    images: list  # PIL images
    codes: torch.Tensor  # (B, H, W)


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) with -inf where forbidden -> next token ids (B,)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def default_dtype(device: torch.device, autocast: bool | None) -> torch.dtype | None:
    """bf16 weights on a CUDA device that supports bf16, unless autocast was chosen explicitly; else None (keep)."""
    if device.type == "cuda" and autocast is None and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.as_tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


class LLMCXR:
    """A trained llm-cxr model with its VQ-GAN: ``LLMCXR.from_pretrained(run)``."""

    def __init__(self, run: LoadedRun, vqgan=None, device: str | torch.device = "cpu", autocast: bool | None = None,
                 dtype: torch.dtype | None = None):
        """``dtype``: the LM's weights. Default: bf16 on a GPU that has it (no per-step weight casts; on an H100 the
        small preset's run scored the same and decoded 6x faster than fp32 weights under autocast, see
        benchmarks/results/lm_gpu_generation.md), else as loaded, decoded under bf16 autocast where the hardware
        runs it well. ``autocast=False`` keeps fp32 everywhere."""
        self.run = run
        self.device = torch.device(device)
        self.model = run.model.to(self.device).eval()
        dtype = default_dtype(self.device, autocast) if dtype is None else dtype
        if dtype is not None:
            self.model.to(dtype)
        self.tok = run.tokenizer
        self.map = run.token_map
        self.template = get_template(run.info.template)
        self.max_length = run.info.max_length
        self.vqgan = vqgan
        self._positions = find(self.model)  # 2D image position embeddings, if the run has them
        # the one forward every decoding step goes through (decoding keeps only the last position's logits: the
        # prompt's would be B x T x V floats, 4 GB for 64 prompts of 300 tokens with Pythia's 50k vocabulary)
        self.cxr = CXRModel(self.model, self.map)
        # the run's finding classifier (finding_head: conv), whose reading a guided report states; None if it has none
        head = run.addons.get("finding_head")
        self.finding_head = head.to(self.device) if head is not None else None
        if vqgan is not None:
            c = vqgan.config
            from llm_cxr.vqgan.encode import weights_hash

            self.map.check_vqgan(c.n_embed, c.grid_size, c.fingerprint(), source="the VQ-GAN given",
                                 weights=weights_hash(vqgan) if self.map.vqgan_weights else None)
        # bf16 autocast where the hardware runs it well (CUDA, and CPUs with AVX-512 BF16 / AMX), unless the
        # weights already are in a low precision
        low = dtype is not None and dtype != torch.float32
        self.autocast = (not low and bf16_is_fast(self.device)) if autocast is None else autocast
        self._image_mask = torch.full((len(self.tok),), float("-inf"))
        self._image_mask[list(self.map.image_ids)] = 0.0
        self._text_mask = torch.zeros((len(self.tok),))
        self._text_mask[list(self.map.image_ids) + [self.map.begin_id, self.map.end_id]] = float("-inf")
        vocab_rows = self.model.get_output_embeddings().weight.shape[0] if self.model.get_output_embeddings() else None
        if vocab_rows and vocab_rows > len(self.tok):  # padded output rows are never valid tokens
            pad = torch.full((vocab_rows - len(self.tok),), float("-inf"))
            self._image_mask = torch.cat([self._image_mask, pad])
            self._text_mask = torch.cat([self._text_mask, pad])

    @classmethod
    def from_pretrained(cls, run: str | Path, vqgan: str | Path | None = None, device: str = "cpu",
                        merge: bool = True, autocast: bool | None = None,
                        dtype: torch.dtype | None = None) -> "LLMCXR":
        """Load a run folder (LoRA merged for speed unless ``merge=False``) and its VQ-GAN."""
        from llm_cxr.vqgan import VQGAN

        loaded = load_run(run, merge=merge)
        vq_path = vqgan or loaded.info.resolve("vqgan", loaded.folder)
        vq = None
        if vq_path:
            if not Path(vq_path).exists():
                raise ConfigError(f"the VQ-GAN {vq_path} recorded with {loaded.folder} does not exist; "
                                  f"pass vqgan=PATH")
            vq = VQGAN.from_pretrained(vq_path, device=device)
        return cls(loaded, vq, device, autocast, dtype)

    # ---- inputs -------------------------------------------------------------------------------
    def codes_of(self, images) -> torch.Tensor:
        """Images (paths, PIL, arrays) or codes -> codes (B, H*W)."""
        if isinstance(images, torch.Tensor) and not images.is_floating_point():
            return images.reshape(images.shape[0], -1)
        if isinstance(images, np.ndarray) and images.dtype.kind in "iu" and images.ndim == 2 and \
                images.shape[1] == self.map.tokens_per_image:
            return torch.as_tensor(images).long()
        if self.vqgan is None:
            raise ConfigError("this model has no VQ-GAN to encode images with; pass codes or a vqgan path")
        from llm_cxr.data.images import load_image

        res = self.vqgan.config.resolution
        pil = [load_image(x, size=res) if isinstance(x, (str, Path)) else x for x in images]
        codes = []
        for i in range(0, len(pil), 32):
            codes.append(self.vqgan.encode(self.vqgan.to_tensor(pil[i:i + 32], resize="silent")).flatten(1).cpu())
        return torch.cat(codes)

    # ---- decoding ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], steps: int, allowed: torch.Tensor, sampling: Sampling,
                stop_at_eos: bool, uncond: list[list[int]] | None = None, guidance: float = 1.0,
                image_span: bool = False, plan: torch.Tensor | None = None,
                logprobs: list | None = None) -> torch.Tensor:
        """Generate up to ``steps`` tokens for each prompt; returns (B, steps), EOS-padded after a stop.

        ``image_span``: the prompts end with ``<image>`` and the t-th new token fills grid slot t (each step's
        :class:`~llm_cxr.lm.sequence.ImageInputs` says so: the model sees one token at a time).
        ``plan`` (B, items): the image plan's input per prompt (the unconditional rows get none).
        ``logprobs``: a list that receives, per step, the (B,) log-probability of the chosen tokens under the
        model's constrained distribution (before temperature), what :meth:`CXRModel.token_logprobs` gives
        teacher-forced.
        """
        B = len(prompts)
        seqs = prompts + (uncond or [])
        ids, mask = _left_pad(seqs, self.tok.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # the generator lives where the probabilities are (multinomial refuses a CPU generator for CUDA tensors);
        # the same seed gives the same draws on the same device, not across devices
        gen = torch.Generator(self.device).manual_seed(sampling.seed) if sampling.seed is not None else None
        allowed = allowed.to(self.device)
        out = torch.full((B, steps), self.tok.eos_token_id, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        past = None
        step_ids, step_pos = ids, pos
        image = ImageInputs.of(ids, self.map) if self.map is not None else None  # the prompt: all read
        layout = None
        if plan is not None and self._positions is not None and self._positions.plan is not None:
            if uncond is not None:
                plan = torch.cat([plan, torch.zeros_like(plan)])
            layout = self._positions.plan.layout(plan)  # the same at every step of a drawing
        for t in range(steps):
            if t > 0:
                image = ImageInputs.drawing(step_ids, t - 1, layout) if image_span else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                res = self.cxr(step_ids, mask, image, position_ids=step_pos, cache=past, use_cache=True,
                               logits_to_keep=1)
            past = cache_of(res)
            logits = res.logits[:, -1].float()
            if uncond is not None:
                logits = logits[B:] + guidance * (logits[:B] - logits[B:])
            nxt = _pick(logits + allowed, sampling, gen).cpu()
            if logprobs is not None:
                lp = (logits + allowed).log_softmax(-1).gather(-1, nxt[:, None].to(logits.device)).squeeze(-1)
                logprobs.append(lp.cpu())
            nxt[done] = self.tok.eos_token_id
            out[:, t] = nxt
            if stop_at_eos:
                done |= nxt == self.tok.eos_token_id
                if bool(done.all()):
                    return out[:, :t + 1]
            feed = torch.cat([nxt, nxt]) if uncond is not None else nxt
            step_ids = feed[:, None].to(self.device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return out

    def _text(self, prompts: list[list[int]], sampling: Sampling, max_new_tokens: int) -> list[str]:
        out = self._decode(prompts, max_new_tokens, self._text_mask, sampling, stop_at_eos=True)
        texts = []
        for row in out.tolist():
            if self.tok.eos_token_id in row:
                row = row[:row.index(self.tok.eos_token_id)]
            text = self.tok.decode(row, skip_special_tokens=True)
            end = self.template.end_key.strip()
            texts.append((text.split(end)[0] if end else text).strip())
        return texts

    def _batched(self, n: int, batch_size: int):
        for i in range(0, n, batch_size):
            yield slice(i, min(n, i + batch_size))

    @property
    def guided_reports(self) -> bool:
        """Whether the run was trained to write reports from its own checklist (``stage.report_guided``)."""
        return self.run.info.guided.reports

    @property
    def guided_vqa(self) -> bool:
        """Whether the run was trained to answer questions with its reading in the prompt (``stage.vqa_guided``)."""
        return self.run.info.guided.vqa

    @property
    def guided_images(self) -> bool:
        """Whether the run was trained to draw from reports with their findings listed (``stage.image_guided``)."""
        return self.run.info.guided.images

    def image_sampling(self, seed: int | None = None) -> Sampling:
        """How this run draws unless told otherwise: its recorded ``image_temperature`` (a preset tuned for its
        model, e.g. greedy for the tiny one) or the library's default, nucleus mass ``IMAGE_TOP_P``."""
        t = self.run.info.image_temperature
        return Sampling(temperature=IMAGE_TEMPERATURE if t is None else t, top_p=IMAGE_TOP_P, seed=seed)

    @property
    def image_guidance(self) -> float:
        """The classifier-free guidance scale this run draws with unless told otherwise: its recorded
        ``image_guidance`` (a preset tuned for its model), else 1 (off)."""
        g = self.run.info.image_guidance
        return 1.0 if g is None else float(g)

    def guidance_scale(self, guidance: float | None = None) -> float:
        """The scale a drawing asked for ``guidance`` uses: the given one, else the run's :attr:`image_guidance`.
        Raises ConfigError unless it is > 0."""
        g = self.image_guidance if guidance is None else float(guidance)
        if not g > 0:
            raise ConfigError(f"guidance must be > 0 (1: off), got {g}")
        return g

    @property
    def guide_sides(self) -> bool:
        """Whether the guided report prompt gives sides (``stage.guide_sides``)."""
        return self.run.info.guided.sides

    def read_findings(self, images, batch_size: int = 16, max_new_tokens: int = 160) -> list[list[str]]:
        """The findings present per image, in the checklist's order: the run's finding head's reading
        (``"pleural_effusion:right"`` when the run was trained with sides), or, for a run without one, what the
        model's checklist answer calls present (greedy: a reading is not sampled)."""
        codes = self.codes_of(images)
        if self.finding_head is not None:
            return self.finding_head.predict(codes.to(self.device), sides=self.guide_sides)
        if self.guide_sides:
            log.warning("%s was trained on guided prompts with sides but has no finding head; its checklist answer "
                        "gives none, so the prompt names the findings only", self.run.folder)
        answers = self.answer(codes, CHECKLIST_QUESTIONS[0], Sampling(), max_new_tokens, batch_size, guided=False)
        return [[k for k, v in parse_checklist(a).items() if v] for a in answers]

    def stated_findings(self, images, guided: bool | None = None, findings: Sequence[Sequence[str]] | None = None,
                        batch_size: int = 16, task: str = "report") -> list[list[str]] | None:
        """What a report's (``task="report"``) or a question's (``"vqa"``) prompt will state per image, or None
        for a plain prompt: ``findings`` checked (names, or ``name:side``), or the run's own reading
        (:meth:`read_findings`) when ``guided`` (default: what the run was trained for, :attr:`guided_reports`
        or :attr:`guided_vqa`)."""
        if task not in ("report", "vqa"):
            raise ConfigError(f"task must be 'report' or 'vqa', got {task!r}")
        if findings is not None:
            if len(findings) != len(images):
                raise InputError(f"got {len(images)} images and {len(findings)} finding lists; give one per image")
            return [check_items(fs) for fs in findings]
        if guided is None:
            guided = self.guided_reports if task == "report" else self.guided_vqa
        if guided:
            return self.read_findings(images, batch_size)
        return None

    def generate_report(self, images, sampling: Sampling | None = None, max_new_tokens: int = 160,
                        batch_size: int = 16, sections: str = "findings_impression", guided: bool | None = None,
                        findings: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Reports for images (paths, PIL images, or codes (B, H*W)).

        ``guided`` (default: what the run was trained for, :attr:`guided_reports`): first read the image
        with the checklist (:meth:`read_findings`), then write the report with those findings in its
        prompt. ``findings`` gives that list per image instead (finding names, e.g. ``"pleural_effusion"``, or
        with a side, ``"pleural_effusion:right"``): a reader's own findings, for a report that states them.
        """
        codes = self.codes_of(images)
        stated = self.stated_findings(codes, guided, findings, batch_size)
        if stated is None:  # a plain report
            stated = [None] * len(codes)
        prompts = [encode_prompt(self.tok, self.map, report_prompt(self.template, None, sections, f), c.tolist())[0]
                   for f, c in zip(stated, codes)]
        out: list[str] = []
        for sl in self._batched(len(prompts), batch_size):
            out += self._text(prompts[sl], sampling or Sampling(), self._room(prompts[sl], max_new_tokens))
        return out

    def answer(self, images, questions: Sequence[str], sampling: Sampling | None = None, max_new_tokens: int = 24,
               batch_size: int = 16, guided: bool | None = None,
               findings: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Answers to one question per image (or one question for all images).

        ``guided`` (default: what the run was trained for, :attr:`guided_vqa`): the question's prompt also states
        the run's reading of the image (:meth:`read_findings`); ``findings`` states a reader's own per image."""
        codes = self.codes_of(images)
        if isinstance(questions, str):
            questions = [questions] * len(codes)
        if len(questions) != len(codes):
            raise InputError(f"got {len(codes)} images and {len(questions)} questions; give one question per image")
        stated = self.stated_findings(codes, guided, findings, batch_size, task="vqa") or [None] * len(codes)
        focus = self.run.info.guided.vqa_focus
        prompts = [encode_prompt(self.tok, self.map, vqa_prompt(self.template, q, f, focus=focus), c.tolist())[0]
                   for q, f, c in zip(questions, stated, codes)]
        out: list[str] = []
        for sl in self._batched(len(prompts), batch_size):
            out += self._text(prompts[sl], sampling or Sampling(), self._room(prompts[sl], max_new_tokens))
        return out

    def generate_image(self, reports: Sequence[str], sampling: Sampling | None = None, guidance: float | None = None,
                       batch_size: int = 16, candidates: int = 1,
                       findings: Sequence[Sequence[str]] | None = None,
                       guided: bool | None = None) -> GeneratedImages:
        """Images for reports: always exactly H*W image tokens, decoded by the VQ-GAN.

        ``guidance`` (default: the run's :attr:`image_guidance`): the classifier-free guidance scale, 1 = off.

        ``guided`` (default: what the run was trained for, :attr:`guided_images`): the prompt also lists the
        findings each report asks for, with their sides: ``findings``, or what the report labeler reads in the
        report (:func:`llm_cxr.lm.prompts.requested_findings`). A run with an image plan (``image_plan: true``)
        is given the same findings as a layout, with the lung zone the report places each in
        (:func:`llm_cxr.lm.prompts.plan_items`).

        ``candidates > 1`` draws that many images per report and keeps the one the run's finding head
        (``finding_head: conv``) finds most likely to show ``findings`` (per report: guide items, ``name`` or
        ``name:side``, e.g. what :func:`llm_cxr.lm.prompts.requested_findings` reads in the report) and
        nothing else: reranking, as DALL-E did with CLIP. It costs ``candidates`` times the decoding."""
        if isinstance(reports, str):
            reports = [reports]
        if candidates < 1:
            raise ConfigError(f"candidates must be >= 1, got {candidates}")
        if candidates > 1:
            if self.finding_head is None:
                raise ConfigError(f"{self.run.folder} has no finding head to rank candidate images with "
                                  f"(train a stage with finding_head: conv), so candidates must be 1")
            if findings is None:
                raise InputError(f"ranking {candidates} candidate images needs the findings each of the "
                                 f"{len(reports)} reports asks for (findings=[[...], ...], one list per report)")
        if findings is not None:
            if len(findings) != len(reports):
                raise InputError(f"got {len(reports)} reports and {len(findings)} finding lists; give one per report")
            findings = [check_items(fs) for fs in findings]
        plan = None
        if self.guided_images if guided is None else guided:
            stated = findings if findings is not None else [requested_findings(r) for r in reports]
            if not self.guide_sides:
                stated = [[split_item(i)[0] for i in fs] for fs in stated]
            if self._positions is not None and self._positions.plan is not None:
                layout = [plan_items(fs, r) for fs, r in zip(stated, reports)]  # with the report's zones
                plan = self._positions.plan.vector(layout).repeat_interleave(candidates, dim=0)
        else:
            stated = [None] * len(reports)
        sampling = sampling or self.image_sampling()
        guidance = self.guidance_scale(guidance)
        begin = [self.map.begin_id]
        # the report cut as in training, so the list and the whole image fit; each report's candidates side by side
        one = [image_prompt_ids(self.tok, self.map, self.template, image_prompt(self.template, r, None, f),
                                self.max_length)[0] + begin for r, f in zip(reports, stated)]
        prompts = [p for p in one for _ in range(candidates)]
        uncond = [encode_prompt(self.tok, self.map, image_prompt(self.template, ""))[0] + begin] * len(prompts)
        ids = []
        for sl in self._batched(len(prompts), batch_size):
            ids.append(self._decode(prompts[sl], self.map.tokens_per_image, self._image_mask, sampling, False,
                                    uncond[sl] if guidance != 1.0 else None, guidance, image_span=True,
                                    plan=plan[sl].to(self.device) if plan is not None else None))
        codes = self.map.ids_to_codes(torch.cat(ids))  # (B * candidates, H*W)
        if candidates > 1:
            score = self.finding_head.agreement(codes.to(self.device), [f for f in findings for _ in range(candidates)])
            best = score.view(len(reports), candidates).argmax(1).cpu()
            codes = codes.view(len(reports), candidates, -1)[torch.arange(len(reports)), best]
        codes = codes.reshape(-1, self.map.grid_size, self.map.grid_size)  # (B, H, W)
        images = []
        if self.vqgan is not None:
            for sl in self._batched(len(codes), 32):
                images += self.vqgan.to_pil(self.vqgan.decode(codes[sl].to(self.vqgan.device)))
        return GeneratedImages(images, codes)

    def _room(self, prompts, want: int) -> int:
        longest = max(len(p) for p in prompts)
        ctx = getattr(self.model.config, "max_position_embeddings", None) or self.max_length
        return max(1, min(want, ctx - longest))


__all__ = ["LLMCXR", "GeneratedImages", "Sampling"]
