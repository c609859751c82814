"""Language-model training on two real CPU ranks (accelerate --multi_gpu with ACCELERATE_USE_CPU): a run that
trains, resumes and loads, with one metrics row per step written by the main rank only."""

import csv

import torch
from test_modeling import make_base, make_codes_dataset
from test_vqgan_distributed import _launch

from llm_cxr.data.dataset import load_dataset
from llm_cxr.lm.run import load_run

FAST = ["--batch-size", "2", "--mixed-precision", "no", "--set", "max_length=256", "--set", "lora.r=4",
        "--set", "loop.log_every=1", "--set", "loop.save_every=2", "--set", "loop.eval_every=2"]


def test_two_ranks_train_resume_and_load(tmp_path):
    data = make_codes_dataset(tmp_path / "codes", n=24)
    base = make_base(tmp_path / "base", "neox", texts=load_dataset(data)["report"])
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--base", str(base), *FAST]
    _launch([*args, "--steps", "2"], tmp_path)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]  # the main rank alone writes, header once
    assert rows[-1]["eval_loss"] and float(rows[-1]["eval_loss"]) > 0  # reduced over both ranks
    _launch([*args, "--steps", "4"], tmp_path)
    with open(run / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert (run / "DONE").exists()
    loaded = load_run(run)
    ids = torch.tensor([[1, 2, 3, loaded.token_map.first_id, loaded.token_map.end_id]])
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()
