"""VQ-GAN training, resume after a kill, encoding a dataset, reconstructing files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llm_cxr.cli import main
from llm_cxr.data import schema
from llm_cxr.data.dataset import load_dataset, write_dataset
from llm_cxr.vqgan import VQGAN
from llm_cxr.vqgan.encode import read_codes_info
from llm_cxr.vqgan.train import VQGANTrainConfig, load_train_config

MICRO = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
         "resolution": 16, "n_embed": 32, "embed_dim": 8, "norm_groups": 8}


def _blobs(n, size, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy, r = rng.uniform(3, size - 3, 2).tolist() + [rng.uniform(2, size / 3)]
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 200, 40).astype(np.uint8)
        yield i, Image.fromarray(img)


def make_dataset(path, n=24, size=16):
    def rows(bad):
        for i, img in _blobs(n, size):
            yield {"id": f"b{i}", "patient_id": f"p{i}", "split": "train" if i < n - 4 else "test", "image": img,
                   "report": "", "findings": "[]", "labels": schema.empty_labels(), "masks": [], "source": "test",
                   "meta": "{}"}
    write_dataset(rows, path)
    return path


@pytest.fixture
def micro_yaml(tmp_path):
    import yaml

    p = tmp_path / "micro.yaml"
    p.write_text(yaml.safe_dump({"model": MICRO, "steps": 2, "batch_size": 4, "disc_start": 1, "disc_ndf": 8,
                                 "sample_every": 1, "save_every": 1, "dead_code_every": 1, "log_every": 1}))
    return p


def test_disc_start_null_never_switches_the_discriminator_on(tmp_path, micro_yaml):
    import csv

    data = make_dataset(tmp_path / "ds")
    rows = {}
    for name, value in (("on", "1"), ("off", "null")):
        run = tmp_path / name
        assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(micro_yaml), "--out", str(run),
                     "--set", f"disc_start={value}"]) == 0
        rows[name] = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(float(r["d_loss"]) != 0 for r in rows["on"])  # the same run with a start step does train it
    assert all(float(r["d_loss"]) == 0 and float(r["g_loss"]) == 0 for r in rows["off"])


def test_two_step_cli_run_is_loadable_and_encodes(tmp_path, micro_yaml):
    data = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(micro_yaml), "--out", str(run)]) == 0
    assert (run / "DONE").exists() and (run / "checkpoints" / "last.pt").exists()
    assert json.loads((run / "config.json").read_text())["model"]["n_embed"] == 32
    assert "torch" in json.loads((run / "versions.json").read_text())
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and len(lines) == 3
    assert list((run / "samples").glob("*.png"))
    model = VQGAN.from_pretrained(run)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert model.encode(x).shape == (2, 8, 8)

    out = tmp_path / "enc"
    assert main(["-q", "vqgan", "encode", "--model", str(run), "--data", str(data), "--out", str(out)]) == 0
    ds = load_dataset(out)
    codes = ds.with_format("numpy")[:]["codes"]
    assert codes.shape == (24, 64) and codes.max() < 32
    assert str(ds.data.schema.field("codes").type) == "fixed_size_list<item: int16>[64]"
    assert ds.features["codes"].feature.dtype == "int16"
    # codes are what the model gives for those images
    first = model.encode(model.to_tensor([ds[0]["image"]]))
    assert np.array_equal(first.flatten().numpy(), codes[0])
    assert read_codes_info(out)["fingerprint"] == model.config.fingerprint()

    pngs = tmp_path / "dec"
    assert main(["-q", "vqgan", "decode", "--model", str(run), "--data", str(out), "--n", "3", "--out", str(pngs)]) == 0
    assert len(list(pngs.glob("*.png"))) == 3


def test_training_changes_weights_and_reinitialises_dead_codes(tmp_path, micro_yaml):
    from llm_cxr.vqgan.train import train_vqgan

    data = make_dataset(tmp_path / "ds")
    cfg = load_train_config(str(micro_yaml), data=str(data), out=str(tmp_path / "run"), progress=False,
                            steps=3, dead_code_threshold=10.0)  # every code counts as dead: all re-initialised
    run = train_vqgan(cfg)
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    reinit = [int(float(line.split(",")[header.index("reinit")])) for line in lines[1:]]
    assert max(reinit) == 32


def test_resume_after_kill_finishes_the_run(tmp_path):
    import yaml

    data = make_dataset(tmp_path / "ds", n=40)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": MICRO, "steps": 400, "batch_size": 4, "disc_start": 1000,
                                   "save_every": 5, "log_every": 1}))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llm_cxr", "-q", "vqgan", "train", "--data", str(data), "--config", str(cfg),
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    ck = run / "checkpoints" / "last.pt"
    while time.time() < deadline and not (ck.exists() and ck.stat().st_size > 0 and
                                          len((run / "metrics.csv").read_text().splitlines()) > 12):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "DONE").exists()
    done_before = torch.load(ck, weights_only=True)["step"]
    assert 0 < done_before < 400
    # resume with fewer total steps so the test stays fast
    assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(run),
                 "--steps", str(done_before + 6)]) == 0
    assert torch.load(ck, weights_only=True)["step"] == done_before + 6
    assert (run / "DONE").exists()
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == done_before + 6
    assert steps == sorted(set(steps))  # steps logged after the checkpoint the kill fell back to: logged once


def test_reconstruct_files_skips_bad_ones(tmp_path, micro_yaml):
    data = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    main(["-q", "vqgan", "train", "--data", str(data), "--config", str(micro_yaml), "--out", str(run)])
    good = tmp_path / "a.png"
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "rec"
    assert main(["-q", "vqgan", "reconstruct", str(good), str(bad), "--model", str(run), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_ok"] == 1 and res["n_bad"] == 1 and "b.png" in res["bad_items"][0]["problem"]
    assert (out / "a_recon.png").exists()


def test_train_config_errors(tmp_path):
    from llm_cxr.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown training keys"):
        VQGANTrainConfig.from_dict({"data": "x", "out": "y", "stepz": 3})
    with pytest.raises(ConfigError, match="unknown VQ-GAN preset"):
        load_train_config("enormous", data="x", out="y")
    with pytest.raises(ConfigError, match="mixed_precision"):
        VQGANTrainConfig(data="x", out="y", mixed_precision="fp8")


def test_dead_code_grace_is_the_number_of_unused_steps_before_a_restart(tmp_path, micro_yaml):
    from llm_cxr.vqgan.train import _grace_usage, train_vqgan

    cfg = VQGANTrainConfig(data="x", out="y", dead_code_grace=60)
    u = _grace_usage(cfg)
    assert u * 0.99 ** 59 > cfg.dead_code_threshold > u * 0.99 ** 61  # an unused code dies after 60 steps
    assert _grace_usage(VQGANTrainConfig(data="x", out="y")) == 1.0  # the old start

    def restarts(grace):
        data = make_dataset(tmp_path / "ds") if not (tmp_path / "ds").exists() else tmp_path / "ds"
        run = train_vqgan(load_train_config(str(micro_yaml), data=str(data), out=str(tmp_path / f"run{grace}"),
                                            progress=False, steps=3, dead_code_grace=grace))
        lines = (run / "metrics.csv").read_text().splitlines()
        col = lines[0].split(",").index("reinit")
        return sum(int(float(line.split(",")[col])) for line in lines[1:])

    assert restarts(None) == 0  # three steps are well inside the default grace
    assert restarts(0) > 0  # codes the first steps did not choose are restarted at once


def test_edge_loss_ignores_shading_and_sees_a_missing_line():
    from llm_cxr.vqgan.losses import edge_l1

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 0.2
    assert float(edge_l1(x, x)) == 0
    assert float(edge_l1(x, x + 0.3)) == pytest.approx(0, abs=1e-6)  # a brightness offset has no edges
    lined = x.clone()
    lined[..., :, 10] += 1.0  # a one-pixel bright line
    recon = x.clone().requires_grad_(True)
    loss = edge_l1(lined, recon)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert float(recon.grad[..., :, 9:12].abs().sum()) > 0  # the gradient points at the line's columns
