"""Files from elsewhere never run code: crafted checkpoints are read inertly, and the library has no unsafe calls."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_cxr.errors import InputError
from llm_cxr.vqgan.taming import read_checkpoint_state

LIB = Path(__file__).resolve().parents[1] / "llm_cxr"


class _Payload:
    """Unpickling this creates a folder: proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_crafted_legacy_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "legacy.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)  # torch's legacy reader unpickles its header first
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint_state(ckpt)
    assert not marker.exists()


def test_crafted_zip_checkpoint_runs_nothing_but_its_tensors_load(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "lightning.ckpt"
    weight = torch.arange(6.0).reshape(2, 3)
    # a Lightning-style checkpoint whose non-tensor entries (callbacks, hyper-parameters) carry a payload
    torch.save({"state_dict": {"w": weight}, "callbacks": _Payload(marker)}, ckpt)
    assert read_checkpoint_state(ckpt)["w"].equal(weight)
    assert not marker.exists()


_UNSAFE = {
    r"weights_only\s*=\s*False(?![^\n]*pickle_module=_restricted_pickle)": "torch.load without weights_only",
    r"\bpickle\.loads?\(": "pickle.load",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle",
    r"trust_remote_code\s*=\s*True": "trust_remote_code",
    r"shell\s*=\s*True": "a shell",
    r"\b(?:yaml\.load|yaml\.unsafe_load)\(": "yaml.load (safe_load only)",
}


def test_library_has_no_unsafe_deserialisation_or_shell():
    found = []
    for path in sorted(LIB.rglob("*.py")):
        text = path.read_text()
        for pattern, what in _UNSAFE.items():
            for m in re.finditer(pattern, text):
                found.append(f"{path.relative_to(LIB.parent)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
    assert not found, "unsafe calls:\n" + "\n".join(found)
    # the one torch.load that is not weights_only goes through the restricted unpickler
    assert "pickle_module=_restricted_pickle" in (LIB / "vqgan" / "taming.py").read_text()


# --- images: bombs, endless files and degenerate inputs are refused before they cost memory ---------------------


def _png_header_only(path: Path, width: int, height: int, bit_depth: int, colour: int) -> Path:
    """A PNG whose header claims ``width x height`` (a few dozen bytes: nothing is decoded before the check)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width,height,depth,colour", [(13000, 13000, 16, 0), (12000, 12000, 8, 6)])
def test_png_over_the_pixel_limit_is_refused_from_its_header(tmp_path, width, height, depth, colour):
    from llm_cxr.data.images import load_image, read_image_bytes
    from llm_cxr.errors import ImageReadError

    p = _png_header_only(tmp_path / "bomb.png", width, height, depth, colour)
    with pytest.raises(ImageReadError, match=rf"bomb\.png: image is {width}x{height} .* over the limit"):
        load_image(p)
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image_bytes(p.read_bytes(), "upload.png")


def test_dicom_over_the_pixel_limit_and_deflate_bombs_are_refused(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from test_images import make_dicom

    from llm_cxr.data.images import load_image, set_limits
    from llm_cxr.errors import ImageReadError

    p = make_dicom(tmp_path / "big.dcm", np.zeros((4, 4), np.uint16))
    ds = __import__("pydicom").dcmread(p)
    ds.Rows, ds.Columns = 20000, 20000  # the header claims 400 MP; the pixel data is 32 bytes
    ds.save_as(p)
    with pytest.raises(ImageReadError, match=r"big\.dcm: image is 20000x20000 .* over the limit"):
        load_image(p)
    # deflated: 3000 x 3000 zeros compress to a few kB; with a 1 MP limit the inflated size is refused
    q = make_dicom(tmp_path / "deflated.dcm", np.zeros((3000, 3000), np.uint16))
    ds = __import__("pydicom").dcmread(q)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(q, enforce_file_format=True)
    assert q.stat().st_size < 200_000
    set_limits(pixels=1_000_000)
    try:
        with pytest.raises(ImageReadError, match=r"deflated\.dcm: deflated DICOM inflates"):
            load_image(q)
    finally:
        set_limits()
    assert load_image(q).size == (3000, 3000)  # within the default limit it reads


def test_devices_fifos_and_oversized_files_are_not_read(tmp_path):
    import os

    from llm_cxr.data.images import load_image, set_limits
    from llm_cxr.errors import ImageReadError

    (tmp_path / "zero.dcm").symlink_to("/dev/zero")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path / "zero.dcm")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path / "pipe.png")  # returns at once: a FIFO is never opened
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 3 * 2**20)
    set_limits(file_bytes=2**20)
    try:
        with pytest.raises(ImageReadError, match=r"big\.png: file is 3 MB, over the limit of 1 MB"):
            load_image(big)
    finally:
        set_limits()


@pytest.mark.parametrize("size,why", [((1, 1), "too small"), ((5000, 10), "too small"), ((2000, 300), "strip")])
def test_degenerate_images_are_refused(tmp_path, size, why):
    from PIL import Image

    from llm_cxr.data.images import load_image
    from llm_cxr.errors import ImageReadError

    Image.new("L", size, 128).save(tmp_path / "x.png")
    with pytest.raises(ImageReadError, match=why):
        load_image(tmp_path / "x.png")


def test_mutated_dicom_headers_raise_only_image_errors(tmp_path):
    import warnings

    from test_images import make_dicom

    from llm_cxr.data.images import read_image_bytes
    from llm_cxr.errors import ImageReadError

    good = make_dicom(tmp_path / "g.dcm", (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)).read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    warnings.simplefilter("ignore")  # pydicom warns about every invalid value it meets
    for _ in range(300):
        b = bytearray(good)
        for pos in rng.integers(128, 128 + 400, size=rng.integers(1, 6)):  # the header, past the preamble
            b[pos] = rng.integers(0, 256)
        try:
            read_image_bytes(bytes(b), "m.dcm")
            outcomes["read"] += 1
        except ImageReadError:
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 0


# --- the CLI turns file-system and format errors into one line ----------------------------------------------------


def test_cli_reports_os_and_format_errors_in_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    import llm_cxr.cli as cli

    (tmp_path / "a_file").write_text("x")
    refs = tmp_path / "r.jsonl"
    refs.write_text('{"id": 1, "report": "Clear lungs."}\n')
    # --out below a file: the folder cannot be made
    rc = cli.main(["evaluate", "--predictions", str(refs), "--references", str(refs), "--no-meteor",
                   "--out", str(tmp_path / "a_file" / "res")])
    err = capsys.readouterr().err
    assert rc == 2 and "a_file" in err and "Traceback" not in err

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt.tmp"))

    def truncated(args):
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:60])
        safetensors.torch.load_file(path)

    parser = cli.build_parser()
    for fn, expect in ((full_disk, "ckpt.tmp: the disk is full"), (truncated, "truncated or corrupt")):
        monkeypatch.setattr(cli, "build_parser", lambda: parser)
        monkeypatch.setattr(parser, "parse_args", lambda argv, fn=fn: __import__("argparse").Namespace(
            func=fn, verbose=0, quiet=True))
        assert cli.main([]) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err


# --- unfinished or mismatched models are refused ------------------------------------------------------------------


def test_unfinished_vqgan_run_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    from llm_cxr.cli import main
    from llm_cxr.configs import ALLOW_UNFINISHED_ENV
    from llm_cxr.errors import ConfigError
    from llm_cxr.vqgan.config import preset
    from llm_cxr.vqgan.model import VQGAN

    run = tmp_path / "run"
    VQGAN(preset("tiny")).save_pretrained(run / "model")
    (run / "checkpoints").mkdir()
    (run / "config.json").write_text('{"train": {"steps": 400}}')
    monkeypatch.delenv(ALLOW_UNFINISHED_ENV, raising=False)
    for path in (run, run / "model"):
        with pytest.raises(ConfigError, match=r"unfinished VQ-GAN training run .* of 400 steps.*--allow-unfinished"):
            VQGAN.from_pretrained(path)
    monkeypatch.setenv(ALLOW_UNFINISHED_ENV, "1")
    assert VQGAN.from_pretrained(run) is not None
    monkeypatch.delenv(ALLOW_UNFINISHED_ENV)
    (run / "DONE").write_text("{}")
    assert VQGAN.from_pretrained(run) is not None
    (run / "DONE").unlink()
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["vqgan", "reconstruct", "--model", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path)]) == 2
    assert "unfinished" in capsys.readouterr().err


# --- outputs: distinct, whole, and never in an input folder --------------------------------------------------------


def test_reconstruct_output_names_never_collide():
    from llm_cxr.vqgan.reconstruct import output_names

    files = [Path("good.png"), Path("good.jpg"), Path("x/a.png"), Path("y/a.png"), Path("solo.dcm")]
    names = output_names(files)
    assert len(set(names.values())) == len(files)
    assert names["solo.dcm"] == "solo" and names["good.jpg"] == "good_jpg"


def test_split_loading_and_encoding_write_nothing_into_the_input_dataset(tmp_path):
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.data.synth import SynthConfig, generate_dataset
    from llm_cxr.vqgan.config import preset
    from llm_cxr.vqgan.encode import encode_dataset
    from llm_cxr.vqgan.model import VQGAN

    data = tmp_path / "data"
    generate_dataset(12, data, SynthConfig(size=64), seed=0, progress=False)
    before = sorted(p.name for p in data.iterdir())
    load_dataset(data, split="train")
    VQGAN(preset("tiny")).save_pretrained(tmp_path / "vq")
    encode_dataset(tmp_path / "vq", data, tmp_path / "codes", progress=False, resize="silent")
    assert sorted(p.name for p in data.iterdir()) == before
    assert not (tmp_path / ".codes.tmp").exists() and len(load_dataset(tmp_path / "codes")) == 12


def test_a_vqgan_with_other_weights_is_refused_by_name(tmp_path):
    from test_webapp import MICRO, make_tiny_run

    from llm_cxr.errors import ConfigError
    from llm_cxr.lm.generation import LLMCXR
    from llm_cxr.vqgan import VQGAN, VQGANConfig

    run = make_tiny_run(tmp_path)
    assert LLMCXR.from_pretrained(run, vqgan=tmp_path / "vqgan").vqgan is not None  # its own VQ-GAN
    torch.manual_seed(1)
    VQGAN(VQGANConfig.from_dict(MICRO)).save_pretrained(tmp_path / "other")  # same config, other weights
    with pytest.raises(ConfigError, match=r"weights: trained on the codes of VQ-GAN weights \w+, .* has weights \w+"):
        LLMCXR.from_pretrained(run, vqgan=tmp_path / "other")
