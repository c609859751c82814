"""A web app for a trained model: X-ray -> report, report -> X-ray, X-ray + question -> answer.

Built with Gradio (``pip install 'llm-cxr[web]'``). ``build_app(model)`` returns the
``gr.Blocks``; ``serve(run)`` loads a run and launches it. Safe defaults for a tool that
handles medical images:

* it binds ``127.0.0.1`` (a wider address is a deliberate choice and logs a warning: the app
  has no authentication), never opens a share link, and sends no analytics;
* requests wait in one queue (one model call at a time, ``max_queue`` waiting) instead of
  running the model concurrently or crashing under load, and each client may send at most
  ``rate_per_minute`` requests a minute;
* patient data does not stay: uploads land in a private folder (mode 0700) made for this server, each
  is deleted as soon as it has been read, the folder (and Gradio's cached outputs) when the server
  stops, and the log never holds a file name, report, question or image (a rejected request logs
  only the kind of error);
* uploads are limited in size and read with :func:`llm_cxr.data.images.read_image_bytes`,
  so PNG, JPEG and DICOM are interpreted exactly as in training, and a file that is not an
  image gives a one-line message in the page, never a traceback.

Explanations plug in through ``explainer`` (see :data:`Explainer`; :func:`method_explainer` makes one from any
method of :mod:`llm_cxr.explain`): a heatmap per sentence of a written report, and the words that drove a drawing,
highlighted; without one, both stay hidden.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from llm_cxr.data.images import read_image_bytes
from llm_cxr.errors import ConfigError, ImageReadError, InputError, LLMCXRError
from llm_cxr.lm.generation import LLMCXR

log = logging.getLogger(__name__)

UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
DISPLAY_SIZE = 384  # generated images are upscaled (nearest) to at least this for the page
INTERNAL_ERROR = "Something went wrong on the server (it has been logged). Please try again."


@dataclass
class SentenceHeatmap:
    """Where in the image one sentence of a report came from."""

    sentence: str
    heatmap: np.ndarray  # (H, W), any range; normalised to [0, 1] for display


class Explainer:
    """What the page explains, by one method: ``sentences(model, image, report)`` gives one heatmap per sentence of
    the written report over the image as the model saw it; ``words(model, report, codes)`` gives each word of the
    report with its share of the drawing (min-max normalised to [0, 1]), for the codes the model drew."""

    def sentences(self, model: LLMCXR, image: Image.Image, report: str) -> list[SentenceHeatmap]:
        raise NotImplementedError

    def words(self, model: LLMCXR, report: str, codes) -> list[tuple[str, float]]:
        raise NotImplementedError


class MethodExplainer(Explainer):
    """An :class:`Explainer` from a registered method of :mod:`llm_cxr.explain` (its options, e.g. M2IB's steps)."""

    def __init__(self, method: str = "m2ib", **options):
        from llm_cxr.explain import METHODS

        if method not in METHODS:
            raise ConfigError(f"unknown explanation method {method!r}; choose from {', '.join(sorted(METHODS))}")
        self.method, self.options = method, options

    def sentences(self, model: LLMCXR, image: Image.Image, report: str) -> list[SentenceHeatmap]:
        from llm_cxr.explain import explain

        ex = explain(model, image=image, method=self.method, written=report, **self.options)
        return [SentenceHeatmap(t, m) for t, m in zip(ex.targets, ex.maps)]

    def words(self, model: LLMCXR, report: str, codes) -> list[tuple[str, float]]:
        if self.method == "occlusion":  # occlusion masks code patches: it has no word form
            return []
        from llm_cxr.explain import explain
        from llm_cxr.explain.result import normalise

        ex = explain(model, report=report, codes=codes, method=self.method, **self.options)
        return [(w, float(v)) for w, v in zip(ex.words, normalise(ex.maps[0]))]


def method_explainer(method: str = "m2ib", **options) -> MethodExplainer:
    """The page's explanations by a registered method (:data:`llm_cxr.explain.METHODS`)."""
    return MethodExplainer(method, **options)


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is first imported
    try:
        import gradio as gr
    except ImportError as e:
        raise ConfigError("the web app needs Gradio: pip install 'llm-cxr[web]'") from e
    return gr


# ---- request handlers (plain functions: testable without a browser) ---------------------------

def read_upload(path: str | Path | None, size: int, max_bytes: int, delete: bool = False) -> Image.Image:
    """An uploaded file -> grey image at the model's resolution; :class:`InputError` if unusable.

    ``delete``: remove the file (and its folder, if that is left empty) once read, readable or not."""
    if not path:
        raise InputError("upload a chest X-ray first (PNG, JPEG or DICOM)")
    path = Path(path)
    if not path.exists():
        raise InputError("upload the image again: each upload is deleted once it has been read (patient privacy)")
    try:
        n = path.stat().st_size
        if n > max_bytes:
            raise InputError(f"{path.name} is {n / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
        # decoded under a neutral name, so that no warning the decoder logs carries the file's (often a patient's)
        # name; the user's message gets it back
        neutral = "upload" + path.suffix.lower()
        try:
            return read_image_bytes(path.read_bytes(), neutral, size)
        except ImageReadError as e:
            raise ImageReadError(str(e).replace(neutral, path.name, 1)) from None
    finally:
        if delete:
            _remove_upload(path)


def _remove_upload(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        path.parent.rmdir()  # Gradio puts each upload in a folder of its own; keep it if anything else is there
    except OSError:
        pass


class RateLimit:
    """At most ``per_minute`` requests per client in any 60 s (a sliding window); 0 = no limit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def check(self, client: str) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        with self.lock:
            recent = [t for t in self.seen.get(client, []) if now - t < 60.0]
            if len(recent) >= self.per_minute:
                wait = 60.0 - (now - recent[0])
                self.seen[client] = recent
                raise InputError(f"too many requests: at most {self.per_minute} a minute; try again in {wait:.0f} s")
            recent.append(now)
            self.seen[client] = recent
            if len(self.seen) > 10_000:  # forget idle clients
                self.seen = {k: v for k, v in self.seen.items() if v and now - v[-1] < 60.0}


def heatmap_overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a heatmap (red = high) over a grey image, resized to the image."""
    h = np.asarray(heatmap, dtype=np.float32)
    h = (h - h.min()) / (np.ptp(h) or 1.0)
    h = np.asarray(Image.fromarray((h * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)) / 255.0
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None].repeat(3, -1)
    red = np.zeros_like(grey)
    red[..., 0] = 255.0
    a = alpha * h[..., None]
    return Image.fromarray((grey * (1 - a) + red * a).astype(np.uint8), mode="RGB")


def explain_report(explainer: Explainer | None, model: LLMCXR, image: Image.Image,
                   report: str) -> list[tuple[Image.Image, str]]:
    """The hook for explanations: (overlay, sentence) pairs for the gallery; [] without an explainer."""
    if explainer is None or not report:
        return []
    return [(heatmap_overlay(image, s.heatmap), s.sentence) for s in explainer.sentences(model, image, report)]


def explain_drawing(explainer: Explainer | None, model: LLMCXR, report: str, codes) -> list[tuple[str, float]]:
    """The words of ``report`` with their share of the drawing ``codes``, for the page; [] without an explainer."""
    if explainer is None:
        return []
    return explainer.words(model, report, codes)


def _for_display(img: Image.Image) -> Image.Image:
    if img.width >= DISPLAY_SIZE:
        return img
    scale = -(-DISPLAY_SIZE // img.width)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _guarded(fn, n_outputs: int, limit: RateLimit | None = None):
    """Run a handler; a user's mistake or a server fault becomes (empty outputs..., status message).

    The log gets the kind of error and, for a fault, where it happened, never its message: messages name the
    uploaded file, and file names of medical images often name the patient."""
    gr = _gradio()

    def run(*args, request: gr.Request = None):
        try:
            if limit is not None:
                limit.check(getattr(getattr(request, "client", None), "host", None) or "local")
            return (*fn(*args), "")
        except LLMCXRError as e:
            log.info("rejected request: %s", type(e).__name__)
            return (*([None] * n_outputs), f"⚠ {e}")
        except Exception as e:  # noqa: BLE001 - the page gets a message, the log the error's kind and place
            where = "".join(traceback.format_tb(e.__traceback__, limit=-3))
            log.error("request failed: %s at\n%s", type(e).__name__, where)
            return (*([None] * n_outputs), f"⚠ {INTERNAL_ERROR}")
    run.__name__ = fn.__name__
    return run


class Handlers:
    """The app's three requests, bound to one model."""

    def __init__(self, model: LLMCXR, max_upload_mb: float, explainer: Explainer | None = None,
                 max_report_tokens: int = 160, delete_uploads: bool = True):
        if model.vqgan is None:
            raise ConfigError("the web app needs the model's VQ-GAN to read and draw images; pass vqgan=PATH")
        self.model = model
        self.size = model.vqgan.config.resolution
        self.max_bytes = int(max_upload_mb * 2**20)
        self.explainer = explainer
        self.max_report_tokens = max_report_tokens
        self.delete_uploads = delete_uploads

    def report(self, upload):
        """upload -> (model's view of the image, report, explanation gallery)."""
        image = read_upload(upload, self.size, self.max_bytes, delete=self.delete_uploads)
        text = self.model.generate_report([image], max_new_tokens=self.max_report_tokens)[0]
        return _for_display(image), text, explain_report(self.explainer, self.model, image, text)

    def image(self, report: str, guidance: float, seed: float | None):
        """report text -> (generated image, its words highlighted by their share of the drawing); ``seed`` < 0 or
        empty samples a new image each time."""
        if not report or not report.strip():
            raise InputError("type a report first, e.g. 'Small left pleural effusion. No pneumothorax.'")
        seed = None if seed is None or seed < 0 else int(seed)
        sampling = self.model.image_sampling(seed)
        out = self.model.generate_image([report.strip()], sampling, guidance=float(guidance), batch_size=1)
        return _for_display(out.images[0]), explain_drawing(self.explainer, self.model, report.strip(), out.codes[0])

    def answer(self, upload, question: str):
        """upload + question -> (model's view of the image, answer)."""
        if not question or not question.strip():
            raise InputError("type a question first, e.g. 'Is there a pleural effusion?'")
        image = read_upload(upload, self.size, self.max_bytes, delete=self.delete_uploads)
        return _for_display(image), self.model.answer([image], [question.strip()])[0]


# ---- the page ------------------------------------------------------------------------------------

def build_app(model: LLMCXR, max_upload_mb: float = 10, max_queue: int = 64, explainer: Explainer | None = None,
              max_report_tokens: int = 160, title: str = "llm-cxr", rate_per_minute: int = 30):
    """The Gradio Blocks of the app (not launched). ``max_queue`` requests wait, one runs at a time; a client may
    send ``rate_per_minute`` requests a minute (0: no limit)."""
    private = _private_upload_dir()
    gr = _gradio()
    h = Handlers(model, max_upload_mb, explainer, max_report_tokens)
    limit = RateLimit(rate_per_minute)
    grid = model.map.grid_size
    # delete_cache: every 5 minutes, Gradio removes its cached files (generated images) older than 10 minutes
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(300, 600)) as app:
        gr.Markdown(f"## {title}\nA research model, not a medical device. Images are processed at "
                    f"{h.size}x{h.size} pixels ({grid}x{grid} image tokens); uploads up to {max_upload_mb:g} MB.")
        with gr.Tab("X-ray → report", id="report"):
            with gr.Row():
                with gr.Column():
                    up = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_types=UPLOAD_TYPES,
                                 type="filepath", elem_id="report-upload")
                    btn = gr.Button("Write report", variant="primary", elem_id="report-button")
                with gr.Column():
                    seen = gr.Image(label="What the model sees", type="pil", interactive=False, elem_id="report-seen")
                    text = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="report-text")
                    status = gr.Textbox(label="Status", interactive=False, elem_id="report-status")
            gallery = gr.Gallery(label="Where each sentence comes from", visible=explainer is not None,
                                 elem_id="report-explain")
            btn.click(_guarded(h.report, 3, limit), [up], [seen, text, gallery, status], api_name="report")
        with gr.Tab("Report → X-ray", id="image"):
            with gr.Row():
                with gr.Column():
                    rep = gr.Textbox(label="Report", lines=6, elem_id="image-report",
                                     placeholder="FINDINGS: Small left pleural effusion. No pneumothorax.")
                    guidance = gr.Slider(min(1.0, h.model.image_guidance), 5.0, value=h.model.image_guidance, step=0.25,
                                         label="Guidance (1 = off; higher follows the report more closely)",
                                         elem_id="image-guidance")
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="image-seed")
                    btn2 = gr.Button("Draw X-ray", variant="primary", elem_id="image-button")
                with gr.Column():
                    out = gr.Image(label="Generated X-ray", type="pil", format="png", interactive=False,
                                   elem_id="image-out")
                    status2 = gr.Textbox(label="Status", interactive=False, elem_id="image-status")
            words = gr.HighlightedText(label="Which words drove the drawing (darker: more)", show_legend=False,
                                       show_inline_category=False, visible=explainer is not None,
                                       elem_id="image-explain")
            btn2.click(_guarded(h.image, 2, limit), [rep, guidance, seed], [out, words, status2], api_name="image")
        with gr.Tab("Ask about an X-ray", id="ask"):
            with gr.Row():
                with gr.Column():
                    up3 = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_types=UPLOAD_TYPES,
                                  type="filepath", elem_id="ask-upload")
                    q = gr.Textbox(label="Question", placeholder="Is there a pleural effusion?", elem_id="ask-question")
                    btn3 = gr.Button("Answer", variant="primary", elem_id="ask-button")
                with gr.Column():
                    seen3 = gr.Image(label="What the model sees", type="pil", interactive=False, elem_id="ask-seen")
                    ans = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
                    status3 = gr.Textbox(label="Status", interactive=False, elem_id="ask-status")
            btn3.click(_guarded(h.answer, 2, limit), [up3, q], [seen3, ans, status3], api_name="answer")
    app.queue(default_concurrency_limit=1, max_size=max_queue)
    app.llm_cxr_upload_dir = private
    return app


def _private_upload_dir() -> Path:
    """Where Gradio keeps uploads and outputs: ``GRADIO_TEMP_DIR`` if set, else a new folder only this user can
    read, removed when the process ends (Gradio's default, /tmp/gradio, is shared and kept forever)."""
    import atexit

    given = os.environ.get("GRADIO_TEMP_DIR")
    if given:
        folder = Path(given)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder
    folder = Path(tempfile.mkdtemp(prefix="llm-cxr-uploads-"))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # Gradio reads it when the Blocks are made
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(app, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10, block: bool = True):
    """Start the server; ``block=False`` returns at once (``app.close()`` stops it), else it runs until Ctrl-C."""
    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can use the app (it has no login)", host)
    try:
        app.launch(server_name=host, server_port=port, share=False, max_file_size=f"{max_upload_mb}mb",
                   prevent_thread_lock=True, show_error=False, ssr_mode=False, inbrowser=False, quiet=True)
    except OSError as e:  # gradio: "Cannot find empty port in range ..."
        log.debug("launch failed: %s", e)
        raise ConfigError(f"cannot serve on {host}:{port}: the address is in use or not available; "
                          f"pick another port or host") from e
    log.info("web app at http://%s:%d", host, port)
    if block:
        try:
            while app.is_running:
                time.sleep(0.2)
        finally:  # Ctrl-C: stop the server, then let the interrupt through
            app.close()
    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 7860, vqgan: str | Path | None = None,
          device: str = "cpu", max_upload_mb: float = 10, max_queue: int = 64, block: bool = True,
          explain: str | None = "m2ib", rate_per_minute: int = 30):
    """Load a trained run and serve it until interrupted (or in the background with ``block=False``). ``explain``:
    the method whose per-sentence maps the report tab shows (None: none)."""
    _gradio()  # fail before the model loads if Gradio is missing
    explainer = method_explainer(explain) if explain else None
    model = LLMCXR.from_pretrained(run, vqgan=vqgan, device=device)
    app = build_app(model, max_upload_mb=max_upload_mb, max_queue=max_queue, explainer=explainer,
                    rate_per_minute=rate_per_minute)
    return launch(app, host, port, max_upload_mb, block)
