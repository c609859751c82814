"""VQ-GAN training and encoding on two real CPU ranks (accelerate --multi_gpu with ACCELERATE_USE_CPU)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_vqgan_train import MICRO, make_dataset

from llm_cxr.data.dataset import load_dataset
from llm_cxr.vqgan import VQGAN


def _launch(args, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate launcher not found")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm_cxr", "-q", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_train_resume_and_encode(tmp_path):
    data = make_dataset(tmp_path / "ds", n=40)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": MICRO, "steps": 4, "batch_size": 4, "disc_start": 2, "disc_ndf": 8,
                                   "log_every": 1, "save_every": 2, "dead_code_every": 2}))
    run = tmp_path / "run"
    _launch(["vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(run)], tmp_path)
    assert (run / "DONE").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5  # one header and one row per step, written by the main process only
    # resume the finished run to more steps on two ranks
    _launch(["vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(run), "--steps", "6"], tmp_path)
    assert [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "enc"
    _launch(["vqgan", "encode", "--model", str(run), "--data", str(data), "--out", str(out)], tmp_path)
    ds = load_dataset(out)
    assert len(ds) == 40 and ds["id"] == load_dataset(data)["id"]  # both shards, in order
    model = VQGAN.from_pretrained(run)
    codes = ds.with_format("numpy")[:]["codes"]
    expect = model.encode(model.to_tensor([r["image"] for r in ds.select(range(40))])).flatten(1).numpy()
    assert np.array_equal(codes, expect)
    assert json.loads((out / "vqgan.json").read_text())["n_embed"] == MICRO["n_embed"]
