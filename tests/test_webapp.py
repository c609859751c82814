"""The web app in a real browser: upload -> report, report -> image, a bad upload -> a message.

Runs headless Chromium (Debian's, /usr/bin/chromium) through Playwright against a server on a
free loopback port, with a tiny model built here. The browser tests are skipped, with the
reason, where Gradio, Playwright or Chromium is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm_cxr.errors import ConfigError

CHROMIUM = Path("/usr/bin/chromium")
MICRO = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
         "resolution": 16, "n_embed": 32, "embed_dim": 8, "norm_groups": 8}
TEXTS = ["FINDINGS: No pleural effusion or pneumothorax. The heart size is normal.\nIMPRESSION: Normal chest.",
         "FINDINGS: Small left pleural effusion. Mild cardiomegaly.\nIMPRESSION: Small left effusion.",
         "FINDINGS: Right upper lobe consolidation. No pneumothorax.\nIMPRESSION: Pneumonia."]

_missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
if not CHROMIUM.exists():
    _missing.append(str(CHROMIUM))
needs_browser = pytest.mark.skipif(bool(_missing),
                                   reason=f"the browser test needs {', '.join(_missing)} (pip "
                                          "install 'llm-cxr[web]' playwright; apt-get install chromium)")


def make_tiny_run(root: Path) -> Path:
    """A 2-layer GPT-NeoX with image tokens for a 2-resolution VQ-GAN, saved as a run folder (with the VQ-GAN)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from llm_cxr.lm.run import RunInfo, save_model
    from llm_cxr.lm.tokens import add_image_tokens
    from llm_cxr.train.base import train_text_tokenizer
    from llm_cxr.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.from_dict(MICRO))
    vq_dir = vq.save_pretrained(root / "vqgan")
    tok = train_text_tokenizer(TEXTS * 5, vocab_size=300)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    c = vq.config
    from llm_cxr.vqgan.encode import weights_hash

    token_map = add_image_tokens(tok, model, c.n_embed, c.grid_size, c.fingerprint(), weights_hash(vq))
    # a few steps on image -> report prompts (random codes), so that the page shows words rather than noise
    from llm_cxr.lm.prompts import get_template, report_prompt
    from llm_cxr.lm.sequence import encode_prompt

    rng = torch.Generator().manual_seed(0)
    prompts = [encode_prompt(tok, token_map, report_prompt(get_template("compact")),
                             torch.randint(0, c.n_embed, (c.grid_size ** 2,), generator=rng).tolist())[0]
               for _ in TEXTS]
    answers = [tok(t.split("\n")[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    batch = torch.tensor([p + a + [tok.eos_token_id] * (T - len(p) - len(a)) for p, a in zip(prompts, answers)])
    labels = torch.tensor([[-100] * len(p) + a + [-100] * (T - len(p) - len(a)) for p, a in zip(prompts, answers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(input_ids=batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return save_model(model, tok, token_map, RunInfo(kind="full", base="tiny", vqgan=str(vq_dir), max_length=256),
                      root / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.webapp import build_app, launch, method_explainer

    run = make_tiny_run(tmp_path_factory.mktemp("webapp-model"))
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-uploads"))  # not the shared /tmp/gradio
    try:
        app = build_app(LLMCXR.from_pretrained(run, autocast=False), max_upload_mb=1,
                        explainer=method_explainer("m2ib", steps=2, samples=2))
        port = _free_port()
        launch(app, "127.0.0.1", port, max_upload_mb=1, block=False)
        yield f"http://127.0.0.1:{port}/"
        app.close()
    finally:
        if saved is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001 - a broken browser install is the machine's problem, not the app's
            pytest.skip(f"{CHROMIUM} does not start under Playwright: {str(e).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser):
    pg = browser.new_page(viewport={"width": 1200, "height": 900})
    pg.goto(server, wait_until="domcontentloaded")
    pg.locator("#report-button").wait_for(timeout=30_000)
    yield pg
    pg.close()


def _value(page, elem_id: str, timeout: float = 30_000) -> str:
    """Wait until the textbox (or status box) #elem_id holds text, and return it."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    page.wait_for_function("el => el.value.trim().length > 0", arg=box.element_handle(), timeout=timeout)
    return box.input_value()


def _screenshot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("LLM_CXR_SCREENSHOT_DIR"):
        out = Path(os.environ["LLM_CXR_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)


@needs_browser
def test_upload_gives_a_report_and_a_report_gives_an_image(page, tmp_path):
    xray = tmp_path / "chest.png"
    yy, xx = np.mgrid[:64, :48]
    Image.fromarray(((xx * 3 + yy * 2) % 256).astype(np.uint8)).save(xray)  # not square, not 16 px: preprocessed

    page.locator("#report-upload input[type=file]").set_input_files(str(xray))
    page.locator("#report-upload").get_by_text("chest.png").first.wait_for(timeout=30_000)
    page.locator("#report-button").click()
    report = _value(page, "report-text")
    assert "FINDINGS" in report and "<img_" not in report
    assert page.locator("#report-status textarea").input_value() == ""
    page.locator("#report-seen img").wait_for(timeout=10_000)
    page.locator("#report-explain img").first.wait_for(timeout=30_000)  # a map per sentence (M2IB)
    assert page.locator("#report-explain img").count() >= 1
    _screenshot(page, tmp_path, "webapp_report.png")

    page.get_by_role("tab", name="Report → X-ray").click()
    page.locator("#image-report textarea").fill("FINDINGS: Small left pleural effusion.")
    page.locator("#image-button").click()
    img = page.locator("#image-out img").first
    img.wait_for(timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    assert page.evaluate("el => el.naturalWidth", img.element_handle()) >= 16
    page.get_by_text("effusion", exact=False).last.wait_for(timeout=30_000)  # the words that drove the drawing
    assert "pleural" in page.locator("#image-explain").inner_text()
    _screenshot(page, tmp_path, "webapp_image.png")


@needs_browser
def test_a_text_file_named_png_gets_a_message_not_a_traceback(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not an X-ray\n")
    page.locator("#report-upload input[type=file]").set_input_files(str(bad))
    page.locator("#report-upload").get_by_text("notes.png").first.wait_for(timeout=30_000)
    page.locator("#report-button").click()
    status = _value(page, "report-status")
    assert "notes.png" in status and "not an image" in status
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "File \"" not in body
    assert page.locator("#report-text textarea").input_value() == ""
    _screenshot(page, tmp_path, "webapp_error.png")


def test_uploads_are_checked_before_the_model_sees_them(tmp_path):
    """Without a browser: too large, empty, missing and non-image uploads are InputErrors; images are resized."""
    from llm_cxr.errors import InputError
    from llm_cxr.webapp import read_upload

    ok = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(ok)
    assert read_upload(str(ok), 16, 2**20).size == (16, 16)
    for path, max_bytes, words in [(ok, 10, "the limit is"), (None, 2**20, "upload a chest X-ray"),
                                   (tmp_path / "empty.png", 2**20, "empty")]:
        if path is not None and not path.exists():
            path.write_bytes(b"")
        with pytest.raises(InputError, match=words):
            read_upload(path, 16, max_bytes)


def test_the_explanation_hook_overlays_one_heatmap_per_sentence():
    from llm_cxr.webapp import Explainer, SentenceHeatmap, explain_report

    image = Image.fromarray(np.full((16, 16), 100, np.uint8))

    class Diagonal(Explainer):
        def sentences(self, model, img, report):
            return [SentenceHeatmap(s, np.eye(4) * (i + 1)) for i, s in enumerate(report.split(". "))]

    explainer = Diagonal()
    assert explain_report(None, None, image, "Effusion. Cardiomegaly.") == []
    pairs = explain_report(explainer, None, image, "Small left effusion. Mild cardiomegaly.")
    assert [cap for _, cap in pairs] == ["Small left effusion", "Mild cardiomegaly."]
    overlay = np.asarray(pairs[0][0])
    assert overlay.shape == (16, 16, 3) and overlay[0, 0, 0] > overlay[0, 0, 1] and overlay[0, 15, 0] == 100


def test_a_registered_method_explains_each_sentence_of_the_page_report(tmp_path):
    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.webapp import method_explainer

    model = LLMCXR.from_pretrained(make_tiny_run(tmp_path), autocast=False)
    image = Image.fromarray(np.full((16, 16), 120, np.uint8))
    report = "FINDINGS: Small left pleural effusion. No pneumothorax."
    maps = method_explainer("m2ib", steps=2, samples=2).sentences(model, image, report)
    grid = model.map.grid_size
    assert [m.sentence for m in maps] == ["Small left pleural effusion.", "No pneumothorax."]
    assert all(m.heatmap.shape == (grid, grid) and np.isfinite(m.heatmap).all() for m in maps)
    with pytest.raises(ConfigError, match="unknown explanation method"):
        method_explainer("saliency-magic")


def test_the_drawing_tab_highlights_every_word_of_the_report_by_its_share(tmp_path):
    import torch

    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.webapp import Handlers, explain_drawing, method_explainer

    model = LLMCXR.from_pretrained(make_tiny_run(tmp_path), autocast=False)
    report = "FINDINGS: Small left pleural effusion. No pneumothorax."
    codes = torch.randint(0, model.map.n_codes, (model.map.grid_size ** 2,),
                          generator=torch.Generator().manual_seed(0))
    assert explain_drawing(None, model, report, codes) == []
    pairs = explain_drawing(method_explainer("gradient_x_input"), model, report, codes)
    assert " ".join(w for w, _ in pairs) == report  # every word once, in order: the page shows the report itself
    scores = [v for _, v in pairs]
    assert min(scores) == 0.0 and max(scores) == 1.0  # min-max normalised, and not constant
    assert explain_drawing(method_explainer("occlusion"), model, report, codes) == []  # codes only: no word form
    image, words = Handlers(model, 1, method_explainer("m2ib", steps=2, samples=2)).image(report, 1.0, 0)
    assert image.size[0] >= 16 and [w for w, _ in words] == report.split()


def test_cli_report_skips_unreadable_files_and_fails_only_when_none_is_usable(tmp_path, capsys):
    import json

    from llm_cxr.cli import main

    run = make_tiny_run(tmp_path / "m")
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 16), 90, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "r.jsonl"
    base = ["-q", "generate", "report", "--model", str(run), "--max-new-tokens", "4"]
    assert main(base + [str(good), str(bad), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(good)]
    err = capsys.readouterr().err
    assert f"skipped {bad}" in err and "1 of 2 image(s) skipped" in err
    assert main(base + [str(bad)]) == 3
    assert "none of the 1 image(s) could be read" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "typo.png")]) == 3  # refused before the model loads
    assert "missing, or not a file" in capsys.readouterr().err


def test_uploads_are_deleted_and_the_log_keeps_no_patient_data(tmp_path, caplog):
    import logging

    from llm_cxr.webapp import RateLimit, _guarded

    folder = tmp_path / "upload-hash"
    folder.mkdir()
    bad = folder / "SMITH_JANE_MRN999.png"
    bad.write_text("not an image")

    def handler(path):
        from llm_cxr.webapp import read_upload

        read_upload(path, 16, 2**20, delete=True)
        raise RuntimeError(f"fault while reading {path}")  # not reached: the upload is refused first

    run = _guarded(handler, 1)
    with caplog.at_level(logging.DEBUG, logger="llm_cxr"):
        out = run(str(bad))
        assert "SMITH_JANE_MRN999.png" in out[-1]  # the user is told which file
        assert not bad.exists() and not folder.exists()  # and the upload is gone
        good = tmp_path / "DOE_JOHN.png"
        Image.new("L", (32, 32), 90).save(good)
        out = _guarded(handler, 1)(str(good))  # a server fault: logged by kind and place only
        assert out[-1].startswith("⚠") and not good.exists()
    assert "RuntimeError" in caplog.text
    assert "SMITH" not in caplog.text and "DOE_JOHN" not in caplog.text and "MRN" not in caplog.text

    clock = [0.0]
    limit = RateLimit(2, clock=lambda: clock[0])
    limited = _guarded(lambda: ("ok",), 1, limit)
    assert [limited()[-1] for _ in range(3)] == ["", "", limited()[-1]]
    assert "too many requests" in limited()[-1]
    clock[0] = 61.0
    assert limited()[-1] == ""  # a minute later the client may ask again


def test_uploads_go_to_a_private_folder(monkeypatch):
    import stat

    from llm_cxr.webapp import _private_upload_dir

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    folder = _private_upload_dir()
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and "gradio" not in str(folder)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder / "given"))
    assert _private_upload_dir() == folder / "given"  # a folder the user chose is used as it is
