"""The demo end to end at a tiny size: summary.json, index.html, and a cached second run."""

import json
from pathlib import Path

from llm_cxr.cli import main


def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path):
    out = tmp_path / "OUT"
    args = ["-q", "demo", "--out", str(out), "--n", "60", "--size", "64", "--vqgan-steps", "3",
            "--lm-pretrain-steps", "2", "--lm-steps", "3", "--classifier-epochs", "1", "--n-eval", "6",
            "--n-explain", "2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    for key in ("n_images", "labeler_synthetic_exact_match", "vqgan_psnr", "vqgan_codebook_usage",
                "report_clinical_micro_f1", "image_finding_micro_f1", "vqa_accuracy", "valid_image_rate",
                "image_frechet_floor", "report_floor_nearest_report"):
        assert key in m, key
        assert key not in summary, f"{key} duplicated at the top level"
    assert m["n_images"] == 60
    assert m["labeler_synthetic_exact_match"] >= 0.95
    assert m["valid_image_rate"] == 1.0  # constrained decoding: every request gives a decodable image
    # realism against the same studies' reconstructions: computed (not None), a finite distance
    assert isinstance(m["image_frechet"], float) and 0 <= m["image_frechet"] < float("inf")
    assert all(not s["cached"] for s in summary["stages"].values())
    assert all(Path(p).exists() for p in summary["paths"].values())
    # drawings were scored with the guidance scale the trained run recorded (its preset's), and say so
    recorded = json.loads((Path(summary["paths"]["model"]) / "model" / "run.json").read_text())["image_guidance"]
    drawn = json.loads((out / "cache" / "generate" / "eval.json").read_text())["images"]
    assert recorded is not None and drawn["guidance"] == recorded
    page = (out / "index.html").read_text()
    assert "VQ-GAN" in page and "FINDINGS:" in page and page.count("<img") >= 10
    for src in [p.split('"')[1] for p in page.split('src=')[1:]]:
        assert (out / src).exists(), src
    # the model's own outputs are on the page: a generated report beside the true one, a drawing, an answer
    wrote = page.split("What the model wrote")[1].split("<h2>")[0]
    assert "<b>Generated</b><br>" in wrote and "<b>True report</b>" in wrote and "study_" in wrote
    assert 'src="assets/drawn_00.png"' in page and 'src="assets/truth_00.png"' in page
    answered = page.split("What the model answered")[1].split("</table>")[0]
    assert answered.count("<tr>") >= 2
    # and why: each generated sentence of two studies with its M2IB map, beside the study's true masks
    why = page.split("Why it wrote each sentence")[1].split("<h2>")[0]
    assert why.count("<figcaption>true findings") == 2 and why.count("map_00.png") == 2
    assert 0 <= m["explain_pointing_m2ib"] <= 1 and 0 <= m["explain_pointing_random"] <= 1

    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(s["cached"] for s in again["stages"].values())
    assert again["seconds_total"] < summary["seconds_total"]
    assert again["metrics"]["vqgan_psnr"] == m["vqgan_psnr"]
    # a cached run keeps what building cost, and reports its own time apart
    assert again["seconds_built"] == summary["seconds_built"] > 0
    assert [s["built_seconds"] for s in again["stages"].values()] == \
        [s["built_seconds"] for s in summary["stages"].values()]
