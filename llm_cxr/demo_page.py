"""What the demo's page shows of the model's own outputs: reports, drawings and answers beside the truth.

The metrics say how often the model is right; these sections show what it made, so a reader can see what a
number such as "report F1 0.8" looks like, and what is wrong when it is low.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PIL import Image

from llm_cxr.report_html import Page

# key -> (what it is, what it means, the demo's target, which way is better)
METRICS: dict[str, tuple[str, str, float | None, str]] = {
    "report_clinical_micro_f1": ("Reports: findings right (micro-F1)",
                                 "findings the labeler reads in the generated report vs. the study's true findings",
                                 0.80, "higher"),
    "report_laterality_accuracy": ("Reports: sides right", "of the findings found, the share stated on the right side",
                                   0.85, "higher"),
    "vqa_accuracy": ("Answers right (yes/no and side)", "presence and laterality questions answered exactly", 0.85,
                     "higher"),
    "image_finding_micro_f1": ("Drawings: findings right (micro-F1)",
                               "findings a separately trained classifier sees in the drawn image vs. those the report "
                               "asked for (one draw)", 0.60, "higher"),
    "valid_image_rate": ("Drawings: decodable", "requests that gave a whole image", 1.0, "higher"),
    "image_frechet": ("Drawings: realism (Frechet distance)",
                      "distance of drawn images from real ones in the classifier's features; the floor is that of "
                      "other real studies", None, "lower"),
    "vqgan_psnr": ("Image tokenizer: reconstruction (PSNR, dB)", "how faithfully the image tokens redraw a test image",
                   28.0, "higher"),
    "vqgan_ssim": ("Image tokenizer: structure (SSIM)", "structural similarity of reconstructions", None, "higher"),
    "classifier_test_micro_f1": ("Judge classifier (micro-F1 on real test images)",
                                 "how well the classifier that grades drawings reads real images: a ceiling for "
                                 "the drawings' score", None, "higher"),
    "labeler_synthetic_exact_match": ("Labeler: exact finding sets", "the rule-based labeler on the true reports",
                                      0.995, "higher"),
    "explain_pointing_m2ib": ("Explanations: M2IB points at the finding",
                              "share of focal findings (nodule, effusion, tubes, ...) whose M2IB map peaks inside "
                              "the finding's true mask (one grid cell of slack); the floor is random maps", 0.80,
                              "higher"),
}


def metrics_rows(metrics: dict[str, Any], floors: dict[str, float | None]) -> list[dict[str, Any]]:
    """The headline metrics with their meaning, target, floor and whether the target is met."""
    rows = []
    for key, (label, meaning, target, better) in METRICS.items():
        value = metrics.get(key)
        if value is None:
            continue
        met = None if target is None else (value >= target if better == "higher" else value <= target)
        rows.append({"metric": label, "value": value, "target": target, "floor": floors.get(key),
                     "met": {True: "yes", False: "no", None: ""}[met], "meaning": meaning})
    return rows


def explanations_section(page: Page, stage, codes_ds, assets: Path, rel: str) -> int:
    """Why the model wrote what it wrote: for a few test studies, each generated sentence with its M2IB map over the
    image, beside the study's true finding masks. Returns how many maps were shown."""
    from llm_cxr.data.schema import FINDING_NAMES
    from llm_cxr.explain.result import Explanation
    from llm_cxr.report_html import overlay_masks

    info, rows = stage.info, {sid: i for i, sid in enumerate(codes_ds["id"])}
    page.heading("Why it wrote each sentence: M2IB maps over the image (brighter: the sentence depends on it more)")
    page.paragraph(f"Over {info['targets']} focal findings of test studies, each explained by the sentence of the "
                   "model's report that states it, the M2IB map peaks inside the finding's true mask "
                   f"{info['pointing_m2ib']:.0%} of the time (random maps: {info['pointing_random']:.0%}); "
                   f"{info['seconds_per_sentence']:.1f} s per sentence. Left: the study with its true findings' "
                   "masks tinted; then one map per generated sentence.")
    cards, shown = [], 0
    for sid in info["studies"]:
        if sid not in rows:
            continue
        row = codes_ds[rows[sid]]
        ex = Explanation.load(stage.path / sid)
        image = row["image"].convert("L")
        masks = [(m["finding"], m["mask"]) for m in row["masks"] or []]
        truth = _save(overlay_masks(image, masks, FINDING_NAMES), assets, f"why_{sid}.png")
        figs = [f'<figure>{_img(f"{rel}/{truth}", "true masks")}<figcaption>true findings</figcaption></figure>']
        for k, path in enumerate(ex.plot(assets / f"why_{sid}", image=image.resize((160, 160)))):
            figs.append(f'<figure>{_img(f"{rel}/why_{sid}/{path.name}", ex.targets[k])}'
                        f"<figcaption>{html.escape(ex.targets[k])}</figcaption></figure>")
            shown += 1
        cards.append(f'<div class="card wide"><div class="imgs">{"".join(figs)}</div></div>')
    page.cards(cards)
    return shown


def _compare(reference: str, generated: str) -> str:
    """The findings each report states, as tags: agree (both), missed (reference only), extra (generated only)."""
    from llm_cxr.data.labeler import label_report

    def stated(text: str) -> dict[str, str]:
        out = {}
        for f in label_report(text).findings:
            out[f.name] = f"{f.name.replace('_', ' ')}{f' ({f.laterality})' if f.laterality else ''}"
        return out

    ref, gen = stated(reference), stated(generated)
    tags = []
    for name in sorted(set(ref) | set(gen)):
        if name in ref and name in gen:
            same = ref[name] == gen[name]
            tags.append(("agree" if same else "side differs", ref[name] if same else f"{ref[name]} vs {gen[name]}"))
        elif name in ref:
            tags.append(("missed", ref[name]))
        else:
            tags.append(("extra", gen[name]))
    if not tags:
        return '<span class="tag agree">both normal</span>'
    return "".join(f'<span class="tag {kind.split()[0]}" title="{kind}">{html.escape(kind)}: {html.escape(text)}'
                   "</span>" for kind, text in tags)


def _save(img: Image.Image, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / name)
    return name


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" title="{html.escape(alt)}" width="160">'


def outputs_sections(page: Page, eval_dir: Path, codes_ds, vqgan, assets: Path, rel: str) -> int:
    """Add the reports, drawings and answers sections; returns how many outputs were shown."""
    import json

    res = json.loads((eval_dir / "eval.json").read_text())
    rows = {sid: i for i, sid in enumerate(codes_ds["id"])}

    def study_image(sid: str) -> str:
        return f"{rel}/" + _save(codes_ds[rows[sid]]["image"], assets, f"study_{sid}.png")

    shown = 0
    page.heading("What the model wrote: test images, the true report and the generated one")
    cards = []
    for ex in res["reports"].get("examples", []):
        if ex["id"] not in rows:
            continue
        cards.append(f'<div class="card wide">{_img(study_image(ex["id"]), ex["id"])}<div>'
                     f'<div>{_compare(ex["reference"], ex["generated"])}</div>'
                     f'<p><b>True report</b><br>{html.escape(ex["reference"])}</p>'
                     f'<p><b>Generated</b><br>{html.escape(ex["generated"])}</p></div></div>')
        shown += 1
    page.cards(cards)
    images = res.get("images", {})
    if images.get("reports"):
        import torch

        page.heading("What the model drew: the drawing, the true study (redrawn from its codes), the report asked for")
        cards = []
        for i, (sid, report) in enumerate(zip(images.get("ids", []), images["reports"])):
            drawn = eval_dir / f"eval_image_{i:02d}.png"
            if not drawn.exists() or sid not in rows:
                continue
            _copy(drawn, assets / f"drawn_{i:02d}.png")
            recon = vqgan.to_pil(vqgan.decode(torch.as_tensor(codes_ds[rows[sid]]["codes"]).long()[None]))[0]
            true = _save(recon, assets, f"truth_{i:02d}.png")
            cards.append(f'<div class="card wide"><div class="imgs">'
                         f'<figure>{_img(f"{rel}/drawn_{i:02d}.png", "drawn")}<figcaption>drawn</figcaption></figure>'
                         f'<figure>{_img(f"{rel}/{true}", "true study, redrawn from its codes")}'
                         f'<figcaption>true study</figcaption></figure></div>'
                         f'<p><b>Asked for</b><br>{html.escape(report)}</p></div>')
            shown += 1
        page.cards(cards)
    qa = res.get("vqa", {}).get("examples", [])
    if qa:
        page.heading("What the model answered")
        page.table([{"study": ex.get("id", ""), "question": ex["q"], "model": ex["got"], "truth": ex["answer"],
                     "right": "yes" if ex["got"].strip().lower() == ex["answer"].lower() else "no"} for ex in qa])
        shown += len(qa)
    return shown


def _copy(src: Path, dst: Path) -> None:
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
