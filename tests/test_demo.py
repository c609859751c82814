"""The demo end to end at a tiny size: summary.json, index.html, and a cached second run."""

import json

from llm_cxr.cli import main


def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path):
    out = tmp_path / "OUT"
    args = ["-q", "demo", "--out", str(out), "--n", "60", "--size", "64", "--vqgan-steps", "3",
            "--lm-pretrain-steps", "2", "--lm-steps", "3", "--classifier-epochs", "1", "--n-eval", "6"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("n_images", "labeler_synthetic_exact_match", "vqgan_psnr", "vqgan_codebook_usage", "seconds_total",
                "report_clinical_micro_f1", "image_finding_micro_f1", "vqa_accuracy", "valid_image_rate"):
        assert key in summary, key
    assert summary["n_images"] == 60
    assert summary["labeler_synthetic_exact_match"] >= 0.95
    assert summary["valid_image_rate"] == 1.0  # constrained decoding: every request gives a decodable image
    # realism against the same studies' reconstructions: computed (not None), a finite distance
    assert isinstance(summary["image_frechet"], float) and 0 <= summary["image_frechet"] < float("inf")
    assert all(not s["cached"] for s in summary["stages"].values())
    page = (out / "index.html").read_text()
    assert "VQ-GAN" in page and "FINDINGS:" in page and page.count("<img") >= 10
    for src in [p.split('"')[1] for p in page.split('src=')[1:]]:
        assert (out / src).exists(), src

    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(s["cached"] for s in again["stages"].values())
    assert again["seconds_total"] < summary["seconds_total"]
    assert again["vqgan_psnr"] == summary["vqgan_psnr"]
