"""Hostile inputs, injected faults and load against the real CLI (issue 26: reliability and security).

Every case runs ``python -m llm_cxr ...`` as its own process, in its own session (so a timeout kills the
whole process group), with a wall-clock timeout (a timeout is a hang), stdin closed and an address-space
limit. For each case the table records the exit code, seconds, the child's peak RSS, whether its output
holds a raw Python traceback, and the first line of its message. Outcomes:

* ``ok``: exit 0; ``clear error``: non-zero exit, a message, no traceback;
* failures: ``TRACEBACK`` (a raw traceback in stdout or stderr), ``HANG`` (killed at the timeout),
  ``CODE EXECUTED`` (a crafted checkpoint created its marker folder), ``CRASH`` (killed by a signal,
  e.g. out of memory, or a non-zero exit without a word) and any case whose outcome is not the one
  expected (an unexpected ok on a bomb counts as much as an unexpected error on a good image), or that
  fails its own check (a batch job that does not count its skipped items; a YAML alias bomb refused, but
  only after expanding it for longer than its budget).

Every input is built in a temporary folder; the real images of ``../shared/data/realcxr-dev/images/`` are
read in place (cases that need them are skipped, with the reason, when they are absent). The models are
the demo's (``OUT/cache/lm/run``, ``OUT/cache/vqgan/run``, from ``llm-cxr demo``) unless given.

    python benchmarks/bench_hostile.py [--lm RUN] [--vqgan RUN] [--timeout 120] [--mem-gb 8]
                                       [--only TEXT[,TEXT...]] [--no-write]

Exits 1 if any case is a failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_IMAGES = REPO.parent / "shared" / "data" / "realcxr-dev" / "images"
TRACEBACK = "Traceback (most recent call last)"
FAILURES = ("TRACEBACK", "HANG", "CODE EXECUTED", "CRASH")
LOAD_TIMEOUT = 300.0  # the batch cases decode dozens of images (about 2 s each for a full-size CXR on 2 busy cores)


@dataclass
class Case:
    category: str
    name: str
    args: list[str]  # after `python -m llm_cxr`
    expect: str  # "ok", "error" or "any" (either is fine; a traceback, hang or crash never is)
    command: str = ""  # short form for the table, e.g. "vqgan reconstruct"
    env: dict[str, str] = field(default_factory=dict)
    marker: Path | None = None  # must not exist after the case (a crafted pickle would create it)
    check: Callable[[str, str], str | None] | None = None  # (stdout, stderr) -> a problem, or None
    interrupt_after: float | None = None  # send SIGINT to the process group after this many seconds
    timeout: float | None = None
    budget_s: float | None = None  # a clear answer that takes longer than this is still a failure
    skip: str | None = None


@dataclass
class Result:
    category: str
    case: str
    command: str
    expect: str
    outcome: str
    exit: int | None
    seconds: float
    peak_mb: float | None
    output_kb: float
    message: str
    unexpected: str | None = None
    traceback_tail: str | None = None


# ---- input builders --------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int, bit_depth: int, color_type: int, idat: bool) -> Path:
    """A hand-written PNG whose IHDR claims WIDTHxHEIGHT: a few hundred bytes that would decode to gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr)
    if idat:
        body += png_chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b""))
    return path


def gradient(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x + 2 * y) * 255 / (w + 2 * h)).astype(np.uint8)


def save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def make_dicom(path: Path, pixels: np.ndarray, rows: int | None = None, cols: int | None = None,
               deflated: bool = False) -> Path:
    """A valid 16-bit MONOCHROME2 DICOM (as tests/test_images.py makes one); ROWS/COLS may lie about the size."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows or pixels.shape[0], cols or pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_mutations(base: Path, folder: Path, n: int = 20) -> list[Path]:
    """N copies of BASE with 1-8 random bytes overwritten in the 400 bytes after the preamble (seeded)."""
    data = base.read_bytes()
    out = []
    for seed in range(n):
        rng = random.Random(seed)
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[128 + rng.randrange(400)] = rng.randrange(256)
        p = folder / f"mutant_{seed:02d}.dcm"
        p.write_bytes(bytes(b))
        out.append(p)
    return out


def real_images() -> list[Path]:
    if not REAL_IMAGES.is_dir():
        return []
    return sorted(p for p in REAL_IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def image_inputs(d: Path) -> list[tuple[str, Path, str, dict]]:
    """(case name, path, expected outcome, extra environment) for every image input."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good_png = save(d / "good.png", Image.fromarray(gradient(256, 256)))
    good_jpg = save(d / "good.jpg", Image.fromarray(gradient(256, 256)), quality=90)
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    (d / "truncated.jpg").write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    for ext in ("png", "jpg", "dcm"):
        (d / f"random.{ext}").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "text.png").write_text("FINDINGS: this is not an image.\n" * 20)
    (d / "folder.png").mkdir()
    os.symlink("/dev/zero", d / "zero.dcm")
    os.mkfifo(d / "fifo.png")
    save(d / "one_pixel.png", Image.new("L", (1, 1), 128))
    save(d / "strip_1x5000.png", Image.fromarray(gradient(1, 5000)))
    save(d / "strip_2000x300.png", Image.fromarray(gradient(2000, 300)))
    save(d / "black.png", Image.new("L", (256, 256), 0))
    frames = [Image.fromarray(np.roll(gradient(128, 128), 20 * i, axis=1)).convert("P") for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    png_header_only(d / "bomb_13000_16bit.png", 13000, 13000, 16, 0, idat=True)
    png_header_only(d / "bomb_rgba_12000.png", 12000, 12000, 8, 6, idat=False)
    save(d / "at_limit_6000.png", Image.new("L", (6000, 6000), 0))
    save(d / "over_limit_6001.png", Image.new("L", (6001, 6000), 0))
    pix = (gradient(64, 64).astype(np.uint16) * 16)
    make_dicom(d / "good.dcm", pix)
    make_dicom(d / "bomb_20000.dcm", pix, rows=20000, cols=20000)
    make_dicom(d / "deflated_3000.dcm", np.zeros((3000, 3000), np.uint16), deflated=True)
    save(d / "sixteen_bit.png", Image.fromarray(gradient(256, 256).astype(np.uint16) * 16))
    save(d / "noise_2mb.png", Image.fromarray(rng.integers(0, 256, (1500, 1500), dtype=np.uint8)))
    save(d / "png_named.jpg", Image.fromarray(gradient(128, 128)), format="PNG")
    save(d / "cmyk.jpg", Image.fromarray(gradient(128, 128)).convert("CMYK"), quality=90)
    items = [
        ("empty file", d / "empty.png", "error", {}),
        ("truncated PNG", d / "truncated.png", "error", {}),
        ("truncated JPEG", d / "truncated.jpg", "error", {}),
        ("random bytes .png", d / "random.png", "error", {}),
        ("random bytes .jpg", d / "random.jpg", "error", {}),
        ("random bytes .dcm", d / "random.dcm", "error", {}),
        ("text file named .png", d / "text.png", "error", {}),
        ("a folder named .png", d / "folder.png", "error", {}),
        ("missing path", d / "no_such_file.png", "error", {}),
        ("symlink to /dev/zero named .dcm", d / "zero.dcm", "error", {}),
        ("FIFO named .png (no writer)", d / "fifo.png", "error", {}),
        ("1x1 PNG", d / "one_pixel.png", "error", {}),
        ("1x5000 PNG", d / "strip_1x5000.png", "error", {}),
        ("2000x300 strip", d / "strip_2000x300.png", "error", {}),
        ("all-black 256x256 (warns)", d / "black.png", "ok", {}),
        ("animated GIF, 3 frames (first used)", d / "animated.gif", "ok", {}),
        ("PNG header 13000x13000 16-bit (~200 B)", d / "bomb_13000_16bit.png", "error", {}),
        ("PNG header RGBA 12000x12000, no data", d / "bomb_rgba_12000.png", "error", {}),
        ("PNG 6000x6000 zeros (36 MP, at the limit)", d / "at_limit_6000.png", "ok", {}),
        ("PNG 6001x6000 zeros (over the limit)", d / "over_limit_6001.png", "error", {}),
        ("DICOM header 20000x20000", d / "bomb_20000.dcm", "error", {}),
        ("deflated DICOM 3000x3000, LLM_CXR_MAX_PIXELS=1e6", d / "deflated_3000.dcm", "error",
         {"LLM_CXR_MAX_PIXELS": "1000000"}),
        ("valid 64x64 DICOM", d / "good.dcm", "ok", {}),
        ("16-bit PNG (12-bit values)", d / "sixteen_bit.png", "ok", {}),
        ("2 MB PNG, LLM_CXR_MAX_FILE_MB=1", d / "noise_2mb.png", "error", {"LLM_CXR_MAX_FILE_MB": "1"}),
        ("PNG named .jpg", d / "png_named.jpg", "ok", {}),
        ("CMYK JPEG", d / "cmyk.jpg", "ok", {}),
    ]
    real = real_images()
    for p in [next((r for r in real if r.suffix == ".jpg"), None), next((r for r in real if r.suffix == ".png"), None)]:
        if p is not None:
            items.append((f"real CXR {p.suffix} ({p.name[:24]})", p, "ok", {}))
    base = d / "good.dcm"
    mdir = d / "mutants"
    mdir.mkdir()
    for i, p in enumerate(dicom_mutations(base, mdir)):
        items.append((f"DICOM header mutation seed {i}", p, "any", {}))
    return items


# ---- cases -----------------------------------------------------------------------------------


def image_cases(tmp: Path, vq: Path | None, lm: Path | None) -> list[Case]:
    items = image_inputs(tmp / "img")
    no_vq = None if vq else "VQ-GAN run not found (run `llm-cxr demo` or pass --vqgan)"
    no_lm = None if lm and vq else "LM or VQ-GAN run not found (run `llm-cxr demo` or pass --lm/--vqgan)"
    cases = []
    for i, (name, path, expect, env) in enumerate(items):
        cases.append(Case("image", name, ["vqgan", "reconstruct", "--model", str(vq), "--out",
                                          str(tmp / "recon" / f"{i:02d}"), str(path)],
                          expect, "vqgan reconstruct", env=env, skip=no_vq))
    # through report generation: the kinds refused before the LM loads (not a file) and, after it loads, a few
    # that reach the same image reader as above
    wanted = ("a folder named .png", "missing path", "symlink to /dev/zero named .dcm", "FIFO named .png (no writer)",
              "empty file", "PNG header 13000x13000 16-bit (~200 B)", "DICOM header 20000x20000")
    for name, path, expect, env in items:
        if name in wanted or name.startswith("real CXR .jpg"):
            cases.append(Case("image", name, _report_args(lm, vq, path), expect, "generate report", env=env,
                              skip=no_lm))
    paths = [str(p) for _, p, _, _ in items]
    n_good = sum(e == "ok" for _, _, e, _ in items)
    n_any = sum(e == "any" for _, _, e, _ in items)

    def batch_check(out: str, err: str) -> str | None:
        try:
            got = json.loads(out[out.index("{"):])
        except ValueError:
            return "no JSON summary on stdout"
        lo, hi = n_good, n_good + n_any
        return None if lo <= got["n_ok"] <= hi else f"n_ok {got['n_ok']}, expected {lo}-{hi}"

    cases.append(Case("load", f"all {len(paths)} image inputs in one reconstruct call", [
        "vqgan", "reconstruct", "--model", str(vq), "--out", str(tmp / "recon" / "batch"), *paths],
        "ok", "vqgan reconstruct", check=batch_check, skip=no_vq, timeout=LOAD_TIMEOUT))
    cases.append(Case("load", f"all {len(paths)} image inputs in one generate call",
                      _report_args(lm, vq, *paths), "ok", "generate report",
                      check=lambda o, e: None if "image(s) skipped" in e else "no count of skipped images",
                      skip=no_lm, timeout=LOAD_TIMEOUT))
    real = real_images()
    cases.append(Case("load", f"{len(real)} real CXRs in one reconstruct call", [
        "vqgan", "reconstruct", "--model", str(vq), "--out", str(tmp / "recon" / "real"),
        *[str(p) for p in real]], "ok", "vqgan reconstruct", timeout=LOAD_TIMEOUT,
        skip=no_vq or (None if real else f"no real images in {REAL_IMAGES}")))
    return cases


def _report_args(lm: Path | None, vq: Path | None, *paths: Path | str) -> list[str]:
    return ["generate", "report", "--model", str(lm), "--vqgan", str(vq), "--max-new-tokens", "60",
            *[str(p) for p in paths]]


def text_cases(tmp: Path) -> list[Case]:
    d = tmp / "text"
    d.mkdir()
    (d / "latin1.txt").write_bytes("Pleural effusion \xe0 droite, c\xf4t\xe9 gauche normal.".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    sentence = "Small right pleural effusion. No pneumothorax. Heart size is normal. "
    (d / "huge_line.txt").write_text(sentence * (2**20 // len(sentence)))
    (d / "huge_negations.txt").write_text("no " * (2**20 // 3))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    label = ["data", "label", "--file"]
    cases = [
        Case("text", "non-UTF-8 (latin-1) report", [*label, str(d / "latin1.txt")], "error"),
        Case("text", "a folder", [*label, str(d)], "error"),
        Case("text", "missing file", [*label, str(d / "nope.txt")], "error"),
        Case("text", "empty file (no findings)", [*label, str(d / "empty.txt")], "any"),
        Case("text", "1 MB single line of report text", [*label, str(d / "huge_line.txt")], "ok"),
        Case("text", "1 MB single line 'no no no ...'", [*label, str(d / "huge_negations.txt")], "ok"),
        Case("text", "binary bytes 0-255", [*label, str(d / "binary.txt")], "error"),
    ]
    for c in cases:
        c.command = "data label"
    return cases + table_cases(tmp)


def table_cases(tmp: Path) -> list[Case]:
    d = tmp / "tables"
    d.mkdir()
    real = real_images()
    (d / "unterminated.csv").write_text('image,report\nx.png,"FINDINGS: no effusion.\ny.png,normal\n')
    (d / "missing_columns.csv").write_text("path,text\nx.png,normal\n")
    (d / "empty.csv").write_bytes(b"")
    (d / "binary.csv").write_bytes(np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (d / "header_only.csv").write_text("image,report\n")
    with open(d / "hostile_paths.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report"])
        for p in ("/dev/zero", "../../../../etc/passwd", "/", "missing.png", "x" * 5000 + ".png"):
            w.writerow([p, "FINDINGS: normal."])
    with open(d / "mixed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report"])
        w.writerow(["/dev/zero", "FINDINGS: normal."])
        w.writerow(["missing.png", "FINDINGS: normal."])
        for p in real[:3]:
            w.writerow([str(p), "FINDINGS: Small right pleural effusion.\nIMPRESSION: Effusion."])
    (d / "bad_lines.jsonl").write_text('{"image": "a.png", "report": "x"}\nnot json\n[1, 2]\n{"image": 5}\n')
    no_real = None if real else f"no real images in {REAL_IMAGES}"
    imp = ["data", "import", "table", "--size", "64"]
    specs = [("CSV with an unterminated quote", "unterminated.csv", "error", None),
             ("CSV without image/report columns", "missing_columns.csv", "error", None),
             ("empty CSV", "empty.csv", "error", None),
             ("binary file named .csv", "binary.csv", "error", None),
             ("CSV with a header and no rows", "header_only.csv", "error", None),
             ("CSV of /dev/zero, ../etc/passwd, /, a 5000-char name", "hostile_paths.csv", "error", None),
             ("JSONL with bad lines", "bad_lines.jsonl", "error", None),
             ("CSV: 3 real images + /dev/zero + a missing file (bad ones skipped)", "mixed.csv", "ok", no_real)]
    def counted(o: str, e: str) -> str | None:
        return None if "2 bad item(s) skipped" in e else "the 2 bad rows were not counted"

    return [Case("table", name, [*imp, str(d / file), "--out", str(tmp / "imported" / f"{i}")], expect,
                 "data import table", check=counted if file == "mixed.csv" else None, skip=skip)
            for i, (name, file, expect, skip) in enumerate(specs)]


def setup_data(tmp: Path, vq: Path | None, timeout: float) -> tuple[Path, Path | None]:
    """A small real dataset (and its encoded copy, for LM training), made once by the CLI itself."""
    data, encoded = tmp / "data", tmp / "encoded"
    for args in (["data", "synth", "--n", "12", "--size", "64", "--out", str(data)],
                 ["vqgan", "encode", "--model", str(vq), "--data", str(data), "--out", str(encoded)] if vq else None):
        if args is None:
            continue
        r = subprocess.run([sys.executable, "-m", "llm_cxr", "-q", *args], capture_output=True, text=True,
                           timeout=timeout, cwd=tmp, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise SystemExit(f"setup failed: llm-cxr {' '.join(args)}\n{r.stderr[-3000:]}")
    return data, encoded if vq else None


BOMB = "YAML alias bomb (9^9 leaves)"
# a 300-byte config is refused in seconds (the other config cases take 3-4 s, start-up included): past 15 s the alias
# tree is being expanded (a failure even if it then ends in a clear error), and at 30 s it counts as a hang
BOMB_LIMITS = {"budget_s": 15.0, "timeout": 30.0}


def _limits(name: str, expect: str, timeout: float) -> dict:
    """A bomb must be refused fast; a real training run (the controls) may take longer than the timeout."""
    return BOMB_LIMITS if name.startswith(BOMB) else {"timeout": max(timeout, LOAD_TIMEOUT)} if expect == "ok" else {}


def bomb_flow(depth: int = 9) -> str:
    """A YAML "billion laughs": nine anchors, each a list of nine aliases of the last (9^9 leaves if expanded)."""
    names = "abcdefghijklmnopqrstuvwxyz"[:depth]
    parts = ["&a [" + ", ".join(["x"] * 9) + "]"]
    parts += [f"&{c} [" + ", ".join(["*" + p] * 9) + "]" for p, c in zip(names, names[1:])]
    return "[" + ", ".join(parts) + "]"


def config_cases(tmp: Path, data: Path, encoded: Path | None, lm_base: Path | None, timeout: float) -> list[Case]:
    d = tmp / "configs"
    d.mkdir()
    # a valid base, and the base model's context: only the key under test is wrong
    base = f"base: {lm_base}\nmax_length: 384\n" if lm_base else ""  # a 16x16 image and its prompt fit
    lm_cfgs = [
        ("YAML list", "- 1\n- 2\n", "error"),
        ("YAML scalar", "just a string\n", "error"),
        ("invalid YAML", "loop: {steps: 1\nstage: [\n", "error"),
        ("wrong nesting (stage: 3)", base + "stage: 3\n", "error"),
        ('wrong type (loop: {steps: "many"})', base + 'loop: {steps: "many"}\n', "error"),
        ("unknown key", base + "learning_rate_typo: 0.1\n", "error"),
        ("unknown nested key (lora.rank)", base + "lora: {rank: 8}\n", "error"),
        ("negative steps (loop.steps: -5)", base + "loop: {steps: -5}\n", "error"),
        (BOMB + " as loop.steps", base + f"loop: {{steps: {bomb_flow()}}}\n", "error"),
        ("valid: 1 step, batch 2 (control)", base + "loop: {steps: 1, batch_size: 2, eval_every: 0, save_every: 1, "
                                                    "mixed_precision: 'no'}\n", "ok"),
    ]
    skip_lm = None if encoded and lm_base else "no VQ-GAN run to encode the data or no base LM (OUT/cache/lm/base)"
    cases = []
    for i, (name, text, expect) in enumerate(lm_cfgs):
        (d / f"lm_{i}.yaml").write_text(text)
        cases.append(Case("config", name, ["train", "--config", str(d / f"lm_{i}.yaml"), "--data", str(encoded),
                                           "--out", str(tmp / "runs" / f"lm_{i}")], expect, "train",
                          skip=skip_lm, **_limits(name, expect, timeout)))
    vq_cfgs = [
        ("model: {ch_mult: 3}", "model: {ch_mult: 3}\n", "error", ["--steps", "1"]),
        ("model: [1, 2]", "model: [1, 2]\n", "error", ["--steps", "1"]),
        ("model: {ch: -4}", "model: {ch: -4}\n", "error", ["--steps", "1"]),
        ("steps: -1 (no --steps)", "model: tiny\nsteps: -1\n", "error", []),
        ("--steps -1 on the command line", "model: tiny\n", "error", ["--steps", "-1"]),
        ("model: no_such_preset", "model: no_such_preset\n", "error", ["--steps", "1"]),
        ("unknown training key", "model: tiny\nbatchsize: 4\n", "error", ["--steps", "1"]),
        (BOMB + " as batch_size", f"model: tiny\nbatch_size: {bomb_flow()}\n", "error", ["--steps", "1"]),
        (BOMB + " as model", f"model: {bomb_flow()}\n", "error", ["--steps", "1"]),
        ("valid: tiny, 1 step (control)", "model: tiny\nbatch_size: 4\nlog_every: 1\n", "ok", ["--steps", "1"]),
    ]
    for i, (name, text, expect, extra) in enumerate(vq_cfgs):
        (d / f"vq_{i}.yaml").write_text(text)
        cases.append(Case("config", name, ["vqgan", "train", "--config", str(d / f"vq_{i}.yaml"), "--data", str(data),
                                           "--out", str(tmp / "runs" / f"vq_{i}"), *extra], expect, "vqgan train",
                          **_limits(name, expect, timeout)))
    (d / "vq_long.yaml").write_text("model: tiny\nbatch_size: 4\nlog_every: 1\nsave_every: 1000000\n")
    cases.append(Case("fault", "SIGINT 20 s into vqgan train", [
        "vqgan", "train", "--config", str(d / "vq_long.yaml"), "--data", str(data), "--out",
        str(tmp / "runs" / "vq_interrupted"), "--steps", "100000"], "error", "vqgan train", interrupt_after=20.0,
        check=lambda o, e: None if "interrupted" in e else "no 'interrupted' message"))
    return cases


# ---- checkpoints and runs --------------------------------------------------------------------


class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def taming_yaml(path: Path, m: dict) -> Path:
    dd = {k: m[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                            "in_channels", "out_ch", "dropout", "double_z")}
    doc = {"model": {"target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": m["embed_dim"], "n_embed": m["n_embed"], "ddconfig": dd}}}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def checkpoint_cases(tmp: Path, vq: Path | None, lm: Path | None, real: Path | None) -> list[Case]:
    if vq is None:
        return [Case("checkpoint", "all checkpoint cases", [], "ok", skip="VQ-GAN run not found")]
    import torch
    from safetensors.torch import load_file

    d = tmp / "ckpt"
    d.mkdir()
    m = json.loads((vq / "model" / "config.json").read_text())
    if m.get("norm_groups", 32) == 32:
        state = load_file(str(vq / "model" / "model.safetensors"))
    else:  # taming's GroupNorm has 32 groups, which the run's model (the tiny preset's 8) cannot be: a small one
        from llm_cxr.vqgan import VQGAN
        from llm_cxr.vqgan.config import preset

        m = preset("small").to_dict()
        state = VQGAN(preset("small")).state_dict()
    cfg = taming_yaml(d / "taming.yaml", m)
    cases = []
    kinds = [("plain pickle.dump of a payload (legacy)", "legacy", "error"),
             ("legacy torch.save: payload + state_dict", "torch_legacy", "ok"),
             ("zip torch.save: payload + state_dict", "torch_zip", "ok"),
             ("zip torch.save: payload only", "torch_zip_only", "error")]
    for i, (name, kind, expect) in enumerate(kinds):
        marker = d / f"PWNED_{i}"
        ckpt = d / f"evil_{i}.ckpt"
        obj = {"state_dict": state, "callbacks": Payload(str(marker))}
        if kind == "legacy":
            with open(ckpt, "wb") as f:
                pickle.dump(Payload(str(marker)), f)
        elif kind == "torch_legacy":
            torch.save(obj, ckpt, _use_new_zipfile_serialization=False)
        elif kind == "torch_zip":
            torch.save(obj, ckpt)
        else:
            torch.save({"hparams": Payload(str(marker))}, ckpt)
        assert not marker.exists()
        cases.append(Case("checkpoint", name, ["vqgan", "import-taming", str(cfg), str(ckpt), "--out",
                                               str(d / f"imported_{i}")], expect, "vqgan import-taming",
                          marker=marker))
    (d / "bad.yaml").write_text("model: {params: {}}\n")
    cases.append(Case("checkpoint", "taming YAML without ddconfig", ["vqgan", "import-taming", str(d / "bad.yaml"),
                                                                      str(d / "evil_2.ckpt"), "--out",
                                                                      str(d / "imported_bad")], "error",
                      "vqgan import-taming"))
    return cases + run_cases(tmp, vq, lm, real)


def run_cases(tmp: Path, vq: Path, lm: Path | None, real: Path | None) -> list[Case]:
    d = tmp / "runcopies"
    d.mkdir()
    img = str(real) if real else str(tmp / "img" / "good.png")

    def vq_copy(name: str) -> Path:
        dst = d / name
        shutil.copytree(vq, dst, ignore=shutil.ignore_patterns("samples"))
        return dst

    trunc = vq_copy("vq_truncated")
    st = trunc / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    huge = vq_copy("vq_header_bomb")
    st = huge / "model" / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 10**15) + st.read_bytes()[8:200])
    garbage = vq_copy("vq_bad_config")
    (garbage / "model" / "config.json").write_text('{"ch": 32, "ch_mult": [1, 2')
    wrong = vq_copy("vq_wrong_config")
    cfg = json.loads((wrong / "model" / "config.json").read_text())
    (wrong / "model" / "config.json").write_text(json.dumps({**cfg, "ch": 48}))
    unfinished = vq_copy("vq_unfinished")
    (unfinished / "DONE").unlink()

    def recon(run: Path, *pre: str) -> list[str]:
        return [*pre, "vqgan", "reconstruct", "--model", str(run), "--out", str(tmp / "recon" / run.name), img]

    warn = lambda o, e: None if "unfinished" in e else "no warning about the unfinished run"  # noqa: E731
    cases = [
        Case("run", "VQ-GAN model.safetensors truncated to half", recon(trunc), "error"),
        Case("run", "VQ-GAN safetensors header length 10^15", recon(huge), "error"),
        Case("run", "VQ-GAN model/config.json cut mid-JSON", recon(garbage), "error"),
        Case("run", "VQ-GAN config.json ch 48, weights ch 32", recon(wrong), "error"),
        Case("run", "VQ-GAN run with checkpoints/ and no DONE",
             recon(unfinished), "error", check=lambda o, e: None if "unfinished" in e else "not called unfinished"),
        Case("run", "VQ-GAN unfinished run, with --allow-unfinished", recon(unfinished, "--allow-unfinished"), "ok",
             check=warn),
    ]
    for c in cases:
        c.command = "vqgan reconstruct"
    if lm is not None:
        cases += lm_run_cases(d, lm, vq, img, warn)
    return cases


def lm_run_cases(d: Path, lm: Path, vq: Path, img: str, warn: Callable) -> list[Case]:
    def lm_copy(name: str, with_base: bool = True) -> Path:
        """A copy of the LM run; its base model is found at ../base beside the run, as the demo lays it out."""
        dst = d / name / lm.name
        shutil.copytree(lm, dst)
        if with_base and (lm.parent / "base").is_dir():
            (d / name / "base").symlink_to(lm.parent / "base")
        if not with_base:  # where run.json looks for its base (the recorded path, then beside the run): nowhere
            info = json.loads((dst / "model" / "run.json").read_text())
            info["base"] = str(d / name / "moved-away" / "base")
            info.get("extra", {}).pop("base_relative", None)
            (dst / "model" / "run.json").write_text(json.dumps(info))
        return dst

    unfinished = lm_copy("lm_unfinished")
    (unfinished / "DONE").unlink()
    trunc = lm_copy("lm_truncated_adapter")
    ad = trunc / "model" / "adapter_model.safetensors"
    ad.write_bytes(ad.read_bytes()[: ad.stat().st_size // 3])
    orphan = lm_copy("lm_without_base", with_base=False)
    return [
        Case("run", "LM run with checkpoints/ and no DONE", _report_args(unfinished, vq, img), "error",
             "generate report", check=lambda o, e: None if "unfinished" in e else "not called unfinished"),
        Case("run", "LM unfinished run, with --allow-unfinished",
             ["--allow-unfinished", *_report_args(unfinished, vq, img)], "ok", "generate report", check=warn),
        Case("run", "LM adapter_model.safetensors truncated", _report_args(trunc, vq, img), "error",
             "generate report"),
        Case("run", "LM run copied without its base model", _report_args(orphan, vq, img), "error",
             "generate report"),
        Case("run", "LM run folder is an image file", _report_args(Path(img), vq, img), "error", "generate report"),
    ]


def output_cases(tmp: Path, vq: Path | None, lm: Path | None, data: Path, real: Path | None) -> list[Case]:
    afile = tmp / "a_regular_file"
    afile.write_text("not a folder\n")
    img = str(real) if real else str(tmp / "img" / "good.png")
    no_vq = None if vq else "VQ-GAN run not found"
    cases = [
        Case("output", "--out under a regular file", ["vqgan", "reconstruct", "--model", str(vq), "--out",
                                                       str(afile / "sub"), img], "error", "vqgan reconstruct",
             skip=no_vq),
        Case("output", "--out is a regular file", ["vqgan", "reconstruct", "--model", str(vq), "--out",
                                                    str(afile), img], "error", "vqgan reconstruct", skip=no_vq),
        Case("output", "--out under a regular file", [*_report_args(lm, vq, img), "--out",
                                                       str(afile / "sub" / "r.jsonl")], "error", "generate report",
             skip=None if lm and vq else "LM run not found"),
        Case("output", "--out under a regular file", ["data", "synth", "--n", "4", "--size", "64", "--out",
                                                       str(afile / "sub")], "error", "data synth"),
        Case("output", "--out under a regular file", ["vqgan", "train", "--config", "tiny", "--data", str(data),
                                                       "--out", str(afile / "sub"), "--steps", "1"], "error",
             "vqgan train"),
    ]
    ro = tmp / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    cases.append(Case("output", "--out in a folder without write permission", [
        "data", "synth", "--n", "4", "--size", "64", "--out", str(ro / "sub")], "error", "data synth",
        skip="running as root: permissions are not enforced" if os.geteuid() == 0 else None))
    return cases


def evaluate_cases(tmp: Path) -> list[Case]:
    d = tmp / "eval"
    d.mkdir()
    reports = ["FINDINGS: Small right pleural effusion. IMPRESSION: Effusion.",
               "FINDINGS: No acute disease. IMPRESSION: Normal chest.",
               "FINDINGS: Cardiomegaly. Left lower lobe atelectasis. IMPRESSION: Enlarged heart."]
    refs = d / "refs.jsonl"
    refs.write_text("".join(json.dumps({"id": f"s{i}", "report": reports[i % 3]}) + "\n" for i in range(30)))
    bad = d / "bad_lines.jsonl"
    lines = [json.dumps({"id": f"s{i}", "report": reports[(i + 1) % 3]}) for i in range(30)]
    lines[3:3] = ["{not json", "[1, 2, 3]", '{"id": "s1"}', json.dumps({"id": "s2", "report": "again"}), "\x00\xff"]
    bad.write_text("\n".join(lines) + "\n")
    (d / "nomatch.jsonl").write_text("".join(json.dumps({"id": f"other{i}", "report": "x"}) + "\n" for i in range(5)))
    (d / "no_report.csv").write_text("id,prediction_text\ns0,normal\ns1,effusion\n")
    (d / "empty.jsonl").write_bytes(b"")
    big_refs = d / "big_refs.jsonl"
    big_refs.write_text("".join(json.dumps({"id": f"b{i}", "report": reports[i % 3]}) + "\n" for i in range(3000)))
    big = d / "big.jsonl"
    big.write_text("".join(json.dumps({"id": f"b{i}", "report": reports[(i * 7) % 3]}) + "\n" for i in range(3000)))
    ev = ["evaluate", "--no-meteor", "--resamples", "20"]

    def counted(o: str, e: str) -> str | None:
        return None if "not scored as given" in e else "bad lines and duplicates were not counted"

    specs = [("predictions missing", d / "missing.jsonl", refs, "error", None),
             ("predictions is a folder", d, refs, "error", None),
             ("bad JSON lines and a duplicate id (counted)", bad, refs, "ok", counted),
             ("no id matches the references", d / "nomatch.jsonl", refs, "error", None),
             ("CSV without a report column", d / "no_report.csv", refs, "error", None),
             ("empty predictions file", d / "empty.jsonl", refs, "error", None),
             ("references missing", bad, d / "no_refs.jsonl", "error", None)]
    cases = [Case("evaluate", name, [*ev, "--predictions", str(p), "--references", str(r), "--out",
                                     str(d / f"out_{i}")], expect, "evaluate", check=check)
             for i, (name, p, r, expect, check) in enumerate(specs)]
    cases.append(Case("load", "evaluate 3000 predictions", [*ev, "--predictions", str(big), "--references",
                                                             str(big_refs), "--out", str(d / "out_big")],
                      "ok", "evaluate", timeout=LOAD_TIMEOUT))
    return cases


# ---- running ---------------------------------------------------------------------------------


def _limit_memory(gb: float) -> Callable[[], None]:
    def apply() -> None:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # A job started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: the child would never see the SIGINT case's signal. A user's
        # Ctrl-C reaches a process whose SIGINT is at its default, so restore that.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return apply


_ERROR_PATTERNS = [re.compile(p) for p in (r"llm-cxr: error:", r"(?i)\berror\b", r"interrupted", r"skipped",
                                              r"WARNING ")]
_OK_PATTERNS = [re.compile(p) for p in (r"\d+ of \d+ image\(s\) skipped", r"bad item\(s\) skipped", r"not scored",
                                           r"skipped", r"WARNING ", r"unfinished")]


def _message(text: str, ok: bool) -> str:
    """The line that says what happened: the error, else a warning or a count of skipped items."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for pattern in _OK_PATTERNS if ok else _ERROR_PATTERNS:
        for ln in lines:
            m = pattern.search(ln)
            if m:
                start = ln.find("WARNING ", 0, m.start() + 1)  # a log line glued to a progress bar
                msg = ln[start if start >= 0 else (m.start() if m.start() > 40 else 0):]
                msg = re.sub(r"^(WARNING|ERROR) [\w.]+: ", r"\1: ", msg)
                return re.sub(r"(\S+): \1: ", r"\1: ", msg)  # "skipped X: X: why" -> "skipped X: why"
    return "" if ok else lines[-1] if lines else ""


def _read_capped(path: Path, cap: int = 2**20) -> str:
    """The first and last CAP bytes of a child's output (a runaway error message can be gigabytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 2 * cap:
            return f.read().decode(errors="replace")
        head = f.read(cap)
        f.seek(size - cap)
        return (head + b"\n[...]\n" + f.read()).decode(errors="replace")


def run_case(case: Case, tmp: Path, timeout: float, mem_gb: float) -> Result:
    out_f, err_f = tmp / "stdout.txt", tmp / "stderr.txt"
    env = {**os.environ, **case.env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llm_cxr", *case.args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, cwd=tmp / "cwd", start_new_session=True,
                                preexec_fn=_limit_memory(mem_gb))
        hung, interrupted = False, False
        limit = case.timeout or timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - t0
            if case.interrupt_after and not interrupted and elapsed > case.interrupt_after:
                os.killpg(proc.pid, signal.SIGINT)
                interrupted = True
            if elapsed > limit:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    try:  # anything the child left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stdout, stderr = _read_capped(out_f), _read_capped(err_f)
    output_kb = (out_f.stat().st_size + err_f.stat().st_size) / 1024
    rc = proc.returncode
    tb = TRACEBACK in stdout or TRACEBACK in stderr
    executed = case.marker is not None and case.marker.exists()
    if hung:
        outcome = "HANG"
    elif executed:
        outcome = "CODE EXECUTED"
    elif tb:
        outcome = "TRACEBACK"
    elif rc < 0:
        outcome = "CRASH"
    else:
        outcome = "ok" if rc == 0 else "clear error"
    message = _message(stderr, outcome == "ok") or _message(stdout, outcome == "ok")
    if outcome == "clear error" and not message:
        outcome = "CRASH"  # a non-zero exit without a word
    unexpected = None
    if outcome not in FAILURES:
        got = "ok" if outcome == "ok" else "error"
        if case.expect != "any" and got != case.expect:
            unexpected = f"expected {case.expect}, got {got}"
        elif case.check is not None:
            unexpected = case.check(stdout, stderr)
        if case.budget_s and seconds > case.budget_s:
            unexpected = f"took {seconds:.0f} s (budget {case.budget_s:.0f} s), peak {usage.ru_maxrss / 2**20:.1f} GB"
    tail = None
    if tb:
        text = stderr if TRACEBACK in stderr else stdout
        tail = "\n".join(text[text.rindex(TRACEBACK):].splitlines()[-12:])
    clean = lambda s: s.replace(str(tmp), "TMP").replace(str(REPO), "REPO")  # noqa: E731
    return Result(case.category, case.name, case.command, case.expect, outcome, rc if not hung else None,
                  round(seconds, 2), round(usage.ru_maxrss / 1024, 1), round(output_kb, 1),
                  clean(message)[:200],
                  clean(unexpected) if unexpected else None, clean(tail) if tail else None)


# The kill -9, full-disk and read-only faults run as tests with real processes (tests/test_faults.py: each kills the
# command with SIGKILL once partial output is on disk, reruns it and compares with a run never killed); the bench
# runs them and reports one row each.
FAULT_TESTS = {
    "tests/test_vqgan_train.py::test_resume_after_kill_finishes_the_run":
        ("kill -9 during VQ-GAN training, then the same command", "vqgan train"),
    "tests/test_faults.py::test_killed_encode_resumes_to_the_same_codes":
        ("kill -9 during encoding, then the same command: same codes", "vqgan encode"),
    "tests/test_faults.py::test_killed_import_resumes_after_its_last_chunk_to_the_same_rows":
        ("kill -9 during an import, then the same command: resumes after its last chunk, same rows", "data import"),
    "tests/test_faults.py::test_killed_evaluate_resumes_to_the_same_metrics":
        ("kill -9 during evaluation, then the same command: same metrics", "evaluate"),
    "tests/test_faults.py::test_killed_lm_training_resumes_to_done_and_equals_a_straight_run":
        ("kill -9 during LM training, then the same command: equals a straight run", "train"),
    "tests/test_faults.py::test_full_disk_during_vqgan_training_keeps_the_last_checkpoint":
        ("full disk (tmpfs) during VQ-GAN training: the last checkpoint kept", "vqgan train"),
    "tests/test_faults.py::test_full_disk_keeps_the_previous_encoding_and_metrics":
        ("full disk (tmpfs): the previous encoding and metrics kept", "vqgan encode"),
    "tests/test_faults.py::test_full_disk_during_generate_keeps_the_previous_reports":
        ("full disk (tmpfs) during generate report --out: the earlier JSONL whole", "generate report"),
    "tests/test_faults.py::test_read_only_output_folder_is_one_clear_line":
        ("read-only output folder: one clear line", "several"),
}


def fault_results(tmp: Path) -> list[Result]:
    """One row per fault test: ok when it passed (the command resumed, or failed cleanly, as the test demands)."""
    import xml.etree.ElementTree as ET

    report = tmp / "faults.xml"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           *FAULT_TESTS], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if not report.exists():
        return [Result("fault", "the fault tests", "pytest", "ok", "CRASH", proc.returncode,
                       round(time.monotonic() - t0, 2), None, 0.0, (proc.stdout + proc.stderr)[-200:])]
    results = []
    for tc in ET.parse(report).getroot().iter("testcase"):
        key = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
        name, command = FAULT_TESTS.get(key, (tc.get("name"), ""))
        failed = next((e for e in tc if e.tag in ("failure", "error")), None)
        skipped = next((e for e in tc if e.tag == "skipped"), None)
        outcome = "ok" if failed is None and skipped is None else ("skipped" if skipped is not None else "failed")
        message = (failed.get("message") if failed is not None else skipped.get("message") if skipped is not None
                   else f"passed: {key}")
        results.append(Result("fault", name, command, "ok", outcome, 0 if outcome == "ok" else 1,
                              round(float(tc.get("time", 0)), 2), None, 0.0, (message or "")[:200],
                              unexpected=None if outcome != "failed" else (message or "failed")[:200]))
    return results


def _default_run(kind: str) -> Path:
    return REPO / "OUT" / "cache" / kind / "run"


def _existing(p: Path | None) -> Path | None:
    return p.resolve() if p is not None and (p / "config.json").exists() else None


def build_cases(tmp: Path, args) -> list[Case]:
    vq, lm = _existing(args.vqgan), _existing(args.lm)
    lm_base = lm.parent / "base" / "model" if lm and (lm.parent / "base" / "model").is_dir() else None
    real = next(iter(real_images()), None)
    print("making the inputs and a 12-image dataset ...", file=sys.stderr)
    data, encoded = setup_data(tmp, vq, args.timeout)
    cases = image_cases(tmp, vq, lm)
    cases += text_cases(tmp)
    cases += config_cases(tmp, data, encoded, lm_base, args.timeout)
    cases += checkpoint_cases(tmp, vq, lm, real)
    cases += output_cases(tmp, vq, lm, data, real)
    cases += evaluate_cases(tmp)
    for c in cases:
        c.command = c.command or " ".join(a for a in c.args[:2] if not a.startswith("-"))
    return cases


def summarize(results: list[Result], skipped: list[dict], seconds: float) -> tuple[dict, list[dict]]:
    count = lambda pred: sum(1 for r in results if pred(r))  # noqa: E731
    summary = {"cases": len(results), "skipped": len(skipped), "ok": count(lambda r: r.outcome == "ok"),
               "clear_error": count(lambda r: r.outcome == "clear error"),
               "tracebacks": count(lambda r: r.outcome == "TRACEBACK"), "hangs": count(lambda r: r.outcome == "HANG"),
               "code_executed": count(lambda r: r.outcome == "CODE EXECUTED"),
               "crashes": count(lambda r: r.outcome == "CRASH"),
               "unexpected": count(lambda r: r.unexpected is not None), "seconds_total": round(seconds, 1)}
    per_cat = []
    for cat in dict.fromkeys(r.category for r in results):
        rs = [r for r in results if r.category == cat]
        per_cat.append({"category": cat, "cases": len(rs), "ok": sum(r.outcome == "ok" for r in rs),
                        "clear error": sum(r.outcome == "clear error" for r in rs),
                        "failures": sum(r.outcome in FAILURES for r in rs),
                        "unexpected": sum(r.unexpected is not None for r in rs),
                        "seconds": round(sum(r.seconds for r in rs), 1)})
    return summary, per_cat


def table_rows(results: list[Result], summary: dict) -> list[dict]:
    rows = [{"category": r.category, "case": r.case.replace("|", "/"), "command": r.command, "expect": r.expect,
             "outcome": r.outcome + (f" (UNEXPECTED: {r.unexpected})" if r.unexpected else ""),
             "exit": r.exit, "seconds": r.seconds, "peak MB": r.peak_mb, "output KB": r.output_kb,
             "message": r.message.replace("|", "/")[:140]} for r in results]
    rows.append({"category": "**all**", "case": f"**{summary['cases']} cases** ({summary['skipped']} skipped)",
                 "command": "", "expect": "",
                 "outcome": f"**{summary['tracebacks']} tracebacks, {summary['hangs']} hangs, "
                            f"{summary['code_executed']} code executed, {summary['crashes']} crashes, "
                            f"{summary['unexpected']} unexpected**",
                 "exit": "", "seconds": summary["seconds_total"], "peak MB": "",
                 "message": f"{summary['ok']} ok, {summary['clear_error']} clear errors"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", type=Path, default=_default_run("lm"), help="LM run (default OUT/cache/lm/run)")
    ap.add_argument("--vqgan", type=Path, default=_default_run("vqgan"),
                    help="VQ-GAN run (default OUT/cache/vqgan/run)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang (default 120)")
    ap.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit of each case (default 8 GB)")
    ap.add_argument("--only", help="run only the cases whose category, name or command contains one of these "
                                   "(comma-separated)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results/hostile.*")
    ap.add_argument("--no-faults", action="store_true", help="skip the kill -9 / full-disk / read-only fault tests")
    args = ap.parse_args()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm_cxr_hostile_") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "cwd").mkdir()
        cases = build_cases(tmp, args)
        if args.only:
            wanted = [w.strip().lower() for w in args.only.split(",")]
            cases = [c for c in cases if any(w in f"{c.category} {c.name} {c.command}".lower() for w in wanted)]
        skipped = [{"category": c.category, "case": c.name, "reason": c.skip} for c in cases if c.skip]
        todo = [c for c in cases if not c.skip]
        results = []
        for i, case in enumerate(todo, 1):
            r = run_case(case, tmp, args.timeout, args.mem_gb)
            results.append(r)
            flag = " <-- " + (r.unexpected or r.outcome) if r.outcome in FAILURES or r.unexpected else ""
            print(f"[{i}/{len(todo)}] {r.category}: {r.case} ({r.command}) -> {r.outcome} rc={r.exit} "
                  f"{r.seconds:.1f}s{flag}", file=sys.stderr)
        if not args.no_faults and (not args.only or any(w.strip() in "fault" for w in args.only.split(","))):
            print("running the kill -9, full-disk and read-only fault tests ...", file=sys.stderr)
            for r in fault_results(tmp):
                results.append(r)
                flag = f" <-- {r.unexpected}" if r.unexpected else ""
                print(f"[fault] {r.case} ({r.command}) -> {r.outcome} {r.seconds:.1f}s{flag}", file=sys.stderr)
        for p in tmp.rglob("*"):  # the read-only folder must not stop the clean-up
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    summary, per_cat = summarize(results, skipped, time.monotonic() - t_start)
    data = {"summary": summary, "timeout_s": args.timeout, "mem_limit_gb": args.mem_gb,
            "lm": str(args.lm), "vqgan": str(args.vqgan), "only": args.only, "per_category": per_cat,
            "cases": [r.__dict__ for r in results], "skipped": skipped}
    tables = [("Every case (TMP = the script's temporary folder)", table_rows(results, summary)),
              ("Per category", per_cat)]
    if skipped:
        tables.append(("Skipped", skipped))
    notes = ("Each case is `python -m llm_cxr ARGS` in its own process group, stdin closed, "
             f"{args.timeout:.0f} s timeout (a timeout is a HANG; {BOMB_LIMITS['timeout']:.0f} s for the YAML alias "
             f"bombs, which must be refused within {BOMB_LIMITS['budget_s']:.0f} s; {LOAD_TIMEOUT:.0f} s for the batch "
             f"'load' cases and the training controls), {args.mem_gb:g} GB address-space limit. "
             "Outcomes: ok (exit 0), clear error (non-zero exit with a one-line message, no traceback); "
             "failures: TRACEBACK, HANG, CODE EXECUTED (a crafted checkpoint's payload ran), CRASH (killed by a "
             "signal, or a silent non-zero exit), and any outcome other than the expected one (expect 'any': "
             "either is fine, e.g. a randomly mutated DICOM header may still be readable). peak MB: the child's "
             "maximum resident set size. Image cases run through `vqgan reconstruct`; the kinds listed twice also "
             "through `generate report` (which loads the LM). Inputs are built in a temporary folder; real images "
             "are read from ../shared/data/realcxr-dev/images/. The 'fault' rows after the SIGINT case are the "
             "fault tests with real processes (kill -9 at a point where partial output is on disk, then the same "
             "command again, compared with a run never killed; a full tmpfs; a read-only folder), run by pytest: "
             "ok = the test passed (skipped where this machine cannot mount a tmpfs).")
    if args.no_write:
        from common import md_table

        print(md_table(tables[0][1]))
        print(md_table(per_cat))
    else:
        write_results("hostile", "Hostile inputs, injected faults and load (CLI)", data, tables, notes)
    for r in results:
        if r.traceback_tail:
            print(f"\nTRACEBACK in {r.category}: {r.case}\n{r.traceback_tail}", file=sys.stderr)
    bad = sum(summary[k] for k in ("tracebacks", "hangs", "code_executed", "crashes", "unexpected"))
    print(f"\n{summary}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
