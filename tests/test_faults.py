"""Faults: kill -9 in the middle of a long command, then the same command again; a full disk; a read-only folder.

Each kill test runs the real command in a process of its own (in its own session, so the kill takes its children
too), waits until partial output is on disk, kills it with SIGKILL, reruns the same command and compares what it
made with a run that was never killed. The disk tests mount a small tmpfs (skipped where mounting is not allowed).
"""

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_lm_train import FAST
from test_modeling import make_base, make_codes_dataset
from test_vqgan_train import MICRO, make_dataset

from llm_cxr.cli import main
from llm_cxr.data.dataset import load_dataset
from llm_cxr.errors import ConfigError
from llm_cxr.lm.run import load_run
from llm_cxr.train.loop import CHECKPOINT

# one thread each: on a small busy machine torch's thread pool makes tiny models many times slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kill_when(args, ready, tmp_path, timeout=120.0) -> None:
    """Run ``llm-cxr -q ARGS`` in its own session and SIGKILL it (with its children) once ``ready()`` holds."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llm_cxr", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=f, start_new_session=True, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the command ended (status {proc.returncode}) before partial output was seen, so "
                            f"nothing was killed: {err.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no partial output after {timeout} s: {err.read_text()[-2000:]}")
            time.sleep(0.01)
        if proc.poll() is not None:
            pytest.fail(f"the command ended (status {proc.returncode}) before the kill: {err.read_text()[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _has_file(folder: Path, pattern: str, min_size: int = 0):
    def size(p: Path) -> int:
        try:
            return p.stat().st_size if p.is_file() else -1
        except OSError:  # renamed or removed meanwhile
            return -1

    return lambda: any(size(p) >= min_size for p in folder.glob(pattern))


# --------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqgan")
    cfg = root / "micro.yaml"
    cfg.write_text(yaml.safe_dump({"model": MICRO, "steps": 2, "batch_size": 4, "disc_start": 1, "disc_ndf": 8,
                                   "sample_every": 1, "save_every": 1, "log_every": 1}))
    data = make_dataset(root / "ds")
    assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(root / "run")]) == 0
    return root / "run"


def test_killed_encode_resumes_to_the_same_codes(vqgan, tmp_path, caplog):
    data = make_dataset(tmp_path / "ds", n=300)
    before = _files(data)
    ref, out = tmp_path / "ref", tmp_path / "enc"
    args = ["vqgan", "encode", "--model", vqgan, "--data", data, "--batch-size", "1", "--chunk-size", "50", "--out"]
    assert main(["-q", *map(str, args[:-1]), "--chunk-size", "300", "--out", str(ref)]) == 0  # in one piece

    def one_piece_done_and_one_started():
        return _has_file(tmp_path / ".enc.tmp", "cache-*")() and _has_file(tmp_path / ".enc.tmp", "tmp*")()

    _kill_when([*args, out], one_piece_done_and_one_started, tmp_path)
    assert not out.exists()  # never a half-written dataset where a reader would look
    caplog.set_level(logging.INFO, logger="llm_cxr.vqgan.encode")
    assert main(["-q", *map(str, args), str(out)]) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming:")]
    assert resumed and 1 <= int(resumed[0].split()[1]) < 6, resumed  # finished pieces reused, the rest encoded
    a, b = load_dataset(ref), load_dataset(out)
    assert a["id"] == b["id"] and a["codes"] == b["codes"]
    assert json.loads((ref / "vqgan.json").read_text()) == json.loads((out / "vqgan.json").read_text())
    assert not (tmp_path / ".enc.tmp").exists()  # the killed run's temporary files are gone
    assert _files(data) == before  # nothing written into the input


def _image_table(folder: Path, n: int) -> Path:
    sentences = ["No pleural effusion.", "Small left pleural effusion.", "Mild cardiomegaly.", "No pneumothorax.",
                 "Right upper lobe consolidation.", "Small right apical pneumothorax.", "The lungs are clear."]
    rng = random.Random(0)
    folder.mkdir()
    lines = ["image,report"]
    for i in range(n):
        Image.fromarray((np.arange(480).reshape(24, 20) * (i + 1) % 256).astype(np.uint8)).save(folder / f"im{i}.png")
        lines.append(f'im{i}.png,"FINDINGS: {" ".join(rng.sample(sentences, 3))}\nIMPRESSION: Stable."')
    (folder / "t.csv").write_text("\n".join(lines) + "\n")
    return folder / "t.csv"


def _chunks_done(manifest: Path):
    def ready() -> bool:
        try:
            return bool(json.loads(manifest.read_text())["chunks"])
        except (OSError, ValueError, KeyError):
            return False

    return ready


def test_killed_import_resumes_after_its_last_chunk_to_the_same_rows(tmp_path, monkeypatch):
    from llm_cxr.data.importers import generic

    n = 1100  # chunks of 512 rows: the kill comes after the first or second
    table = _image_table(tmp_path / "src", n)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["data", "import", "table", table, "--size", "16", "--out"]
    assert main(["-q", *map(str, args), str(ref)]) == 0
    manifest = tmp_path / ".out.partial" / "manifest.json"
    _kill_when([*args, out], _chunks_done(manifest), tmp_path)
    assert not out.exists()
    done = json.loads(manifest.read_text())["chunks"][-1]["position"]
    loaded = []
    real = generic.load_or_skip
    monkeypatch.setattr(generic, "load_or_skip", lambda path, *a: loaded.append(path) or real(path, *a))
    assert main(["-q", *map(str, args), str(out)]) == 0
    assert 0 < done < n and len(loaded) == n - done  # resumed: the images before its last chunk were not read again
    a, b = load_dataset(ref), load_dataset(out)
    assert a.data.table.equals(b.data.table)  # every row, images included
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, out))
    assert {k: v for k, v in sa.items() if k != "out_dir"} == {k: v for k, v in sb.items() if k != "out_dir"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder left


def _reports(path: Path, n: int, seed: int) -> Path:
    sentences = ["No pleural effusion.", "Small left pleural effusion.", "Mild cardiomegaly.", "No pneumothorax.",
                 "Right upper lobe consolidation.", "Small right apical pneumothorax.", "The lungs are clear.",
                 "Bibasilar atelectasis.", "Moderate pulmonary edema.", "Heart size is normal."]
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"id": f"s{i}", "report": " ".join(rng.sample(sentences, 4))}) + "\n"
                            for i in range(n)))
    return path


def test_killed_evaluate_resumes_to_the_same_metrics(tmp_path, caplog):
    preds, refs = _reports(tmp_path / "p.jsonl", 600, 1), _reports(tmp_path / "r.jsonl", 600, 2)
    ref, out = tmp_path / "ref", tmp_path / "m"
    args = ["evaluate", "--predictions", preds, "--references", refs, "--resamples", "50", "--no-meteor", "--out"]
    assert main(["-q", *map(str, args), str(ref)]) == 0
    per_study = out / "system_per_study.jsonl"
    _kill_when([*args, out], lambda: per_study.exists() and per_study.read_text().count("\n") >= 64, tmp_path)
    assert not (out / "metrics.json").exists()
    scored = per_study.read_text().count("\n")
    assert 64 <= scored < 600
    caplog.set_level(logging.INFO, logger="llm_cxr.evaluation.reports")
    assert main(["-q", *map(str, args), str(out)]) == 0
    assert f"{600 - scored} studies to score, {scored} reused" in caplog.text  # resumed, not started again
    assert (ref / "metrics.json").read_text() == (out / "metrics.json").read_text()
    rows = lambda p: sorted((p / "system_per_study.jsonl").read_text().splitlines())  # noqa: E731
    assert rows(ref) == rows(out)


@pytest.fixture(scope="module")
def lm_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    data = make_codes_dataset(root / "codes", n=16)
    return data, make_base(root / "neox", "neox", texts=load_dataset(data)["report"])


def _ckpt_step(run: Path) -> int:
    try:
        return torch.load(run / CHECKPOINT, weights_only=True)["position"]["step"]
    except (OSError, RuntimeError, EOFError):
        return 0


def test_killed_lm_training_resumes_to_done_and_equals_a_straight_run(lm_inputs, tmp_path):
    data, base = lm_inputs
    steps = 30
    args = ["train", "--data", data, "--base", base, "--steps", steps, *FAST, "--set", "loop.save_every=3",
            "--set", "loop.eval_every=0", "--out"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    _kill_when([*args, run], lambda: _ckpt_step(run) >= 3, tmp_path)
    assert not (run / "DONE").exists() and 3 <= _ckpt_step(run) < steps
    with pytest.raises(ConfigError, match="unfinished"):
        load_run(run)
    assert main(["-q", *map(str, args), str(run)]) == 0
    assert json.loads((run / "DONE").read_text()) == {"steps": steps} and _ckpt_step(run) == steps
    logged = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, steps + 1))  # each step once
    # what loads is what was trained last: the final checkpoint's weights, not a half-written or older model
    trained = torch.load(run / CHECKPOINT, weights_only=True)["trainable"]
    params = dict(load_run(run).model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trained.items())
    # and it is the run that was never killed (data position, optimizer and RNG restored)
    assert main(["-q", *map(str, args), str(straight)]) == 0
    other = torch.load(straight / CHECKPOINT, weights_only=True)["trainable"]
    assert all(torch.allclose(trained[n], other[n], atol=1e-6) for n in trained)
    # continued past its end, it is unfinished again until the new end is reached
    assert main(["-q", *map(str, args[:-1]), "--steps", str(steps + 10), "--set", "loop.max_minutes=0",
                 "--out", str(run)]) == 0
    assert _ckpt_step(run) == steps + 1 and not (run / "DONE").exists()
    with pytest.raises(ConfigError, match="unfinished"):
        load_run(run)


# --------------------------------------------------------------------------- a full disk, a read-only folder


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file (delete it to free space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * chunk):
                    pass
    return filler


def _one_line_error(capsys, rc: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("llm-cxr: error: ") and all(w in err for w in words), err
    return err


def test_full_disk_during_vqgan_training_keeps_the_last_checkpoint(vqgan, tmp_path, capsys, monkeypatch):
    from llm_cxr.configs import ALLOW_UNFINISHED_ENV
    from llm_cxr.vqgan import VQGAN

    data, cfg = vqgan.parent / "ds", vqgan.parent / "micro.yaml"
    with _tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        args = ["-q", "vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(run),
                "--set", "sample_every=100"]  # the checkpoint is the one large write
        assert main(args) == 0
        capsys.readouterr()
        filler = _fill(disk)
        rc = main([*args, "--steps", "4"])
        _one_line_error(capsys, rc, "the disk is full", str(run / "checkpoints" / "last.pt"))
        ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert ck["step"] == 2
        assert not list(run.rglob("*.tmp"))  # a failed save leaves no partial file taking the space
        monkeypatch.setenv(ALLOW_UNFINISHED_ENV, "1")  # the run now has 4 steps to go: unfinished
        model = VQGAN.from_pretrained(run)
        assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
        filler.unlink()  # space again: the same command resumes at step 2 and finishes
        assert main([*args, "--steps", "4"]) == 0
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
        assert json.loads((run / "DONE").read_text()) == {"steps": 4}
        assert main([*args, "--steps", "4"]) == 0  # and a finished run rerun is a no-op


def test_full_disk_keeps_the_previous_encoding_and_metrics(vqgan, tmp_path, capsys):
    data = vqgan.parent / "ds"
    preds, refs = _reports(tmp_path / "p.jsonl", 40, 1), _reports(tmp_path / "r.jsonl", 40, 2)
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        enc, metrics = disk / "enc", disk / "m"
        encode = ["-q", "vqgan", "encode", "--model", str(vqgan), "--data", str(data), "--out", str(enc)]
        evaluate = ["-q", "evaluate", "--predictions", str(preds), "--references", str(refs), "--resamples", "20",
                    "--no-meteor", "--out", str(metrics)]
        assert main(encode) == 0 and main(evaluate) == 0
        codes, before = load_dataset(enc)["codes"], (metrics / "metrics.json").read_text()
        capsys.readouterr()
        _fill(disk)
        _one_line_error(capsys, main([*encode, "--batch-size", "3"]), "the disk is full")
        assert load_dataset(enc)["codes"] == codes  # the previous output is untouched
        _reports(preds, 40, 3)  # other predictions: every study is scored again
        _one_line_error(capsys, main(evaluate), "the disk is full", str(metrics))
        assert (metrics / "metrics.json").read_text() == before
        # no half-written file left to fill the disk further (a finished encoding cache may stay: a rerun reuses it)
        assert [p for p in disk.rglob("*") if ".tmp" in str(p) and not p.name.startswith(("cache-", ".enc.tmp"))] == []


def test_full_disk_during_generate_keeps_the_previous_reports(tmp_path, capsys):
    from test_webapp import make_tiny_run

    run = make_tiny_run(tmp_path / "model")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(image)
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "reports.jsonl"
        opts = ["--model", str(run), "--out", str(out)]
        assert main(["-q", "generate", "report", str(image), *opts]) == 0
        before = out.read_text()
        assert before.endswith("\n") and len(before.splitlines()) == 1
        capsys.readouterr()
        _fill(disk)
        _one_line_error(capsys, main(["-q", "generate", "report", str(image), str(image), *opts]), "the disk is full")
        assert out.read_text() == before  # whole lines only: the earlier file is untouched, no half line appended
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]


def test_read_only_output_folder_is_one_clear_line(vqgan, tmp_path, capsys):
    data, cfg = vqgan.parent / "ds", vqgan.parent / "micro.yaml"
    preds = _reports(tmp_path / "p.jsonl", 10, 1)
    table = _image_table(tmp_path / "src", 3)
    with _tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(run)]) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        for args in (["vqgan", "train", "--data", data, "--config", cfg, "--out", run, "--steps", "4"],
                     ["vqgan", "encode", "--model", run, "--data", data, "--out", disk / "enc"],
                     ["evaluate", "--predictions", preds, "--references", preds, "--no-meteor", "--out", disk / "m"],
                     ["data", "import", "table", table, "--size", "16", "--out", disk / "ds"]):
            _one_line_error(capsys, main(["-q", *map(str, args)]), "read-only", str(disk))
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
