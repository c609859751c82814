"""CUDA paths (``pytest -m gpu`` on a machine with a GPU; skipped elsewhere, excluded from the default run):
seeded decoding on the GPU, greedy decoding as on the CPU, bf16 weights, a bf16 training stage on the GPU that
really trains the image rows, the VQ-GAN's codes as on the CPU. (The finding head on CUDA is exercised by
benchmarks/bench_lm_gpu.py's trained-run part, whose reading scores equal the CPU's.)"""

import pytest
import torch
from test_modeling import CODES, GRID, N_CODES, _generator, make_base, make_codes_dataset

from llm_cxr.lm.generation import LLMCXR, Sampling
from llm_cxr.lm.run import load_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-run")
    _generator(make_base(tmp_path_factory.mktemp("gpu-base") / "neox", "neox"), folder)
    return folder


def test_seeded_sampling_runs_on_the_gpu_and_repeats(run):
    g = LLMCXR(load_run(run), vqgan=None, device="cuda")  # the default on a GPU: bf16 weights, no autocast
    assert not g.autocast and g.model.device.type == "cuda" and next(g.model.parameters()).dtype == torch.bfloat16
    s = Sampling(temperature=1.0, top_p=0.9, seed=5)
    a = g.generate_image(["Small left pleural effusion.", ""], sampling=s, guidance=2.0, batch_size=2)
    b = g.generate_image(["Small left pleural effusion.", ""], sampling=s, guidance=2.0, batch_size=2)
    assert a.codes.shape == (2, GRID, GRID) and torch.equal(a.codes, b.codes)
    assert int(a.codes.min()) >= 0 and int(a.codes.max()) < N_CODES
    texts = g.generate_report(CODES, sampling=Sampling(temperature=1.0, seed=0), max_new_tokens=8)
    assert len(texts) == 3 and all("<img_" not in t for t in texts)


def test_gpu_fp32_greedy_matches_the_cpu(run):
    cpu = LLMCXR(load_run(run), vqgan=None, autocast=False)
    gpu = LLMCXR(load_run(run), vqgan=None, device="cuda", autocast=False)
    reports = ["Small left pleural effusion.", "No acute abnormality."]  # different lengths: left padding
    greedy = Sampling()
    assert torch.equal(cpu.generate_image(reports, greedy).codes, gpu.generate_image(reports, greedy).codes)
    assert cpu.generate_report(CODES, max_new_tokens=8) == gpu.generate_report(CODES, max_new_tokens=8)


def test_fp32_weights_under_autocast_on_the_gpu(run):
    g = LLMCXR(load_run(run), vqgan=None, device="cuda", autocast=True)
    assert g.autocast and next(g.model.parameters()).dtype == torch.float32
    out = g.generate_image(["Small left pleural effusion."], sampling=Sampling(temperature=1.0, seed=1))
    assert out.codes.shape == (1, GRID, GRID)


def test_bf16_training_stage_on_the_gpu_trains_the_image_rows(tmp_path):
    from llm_cxr.cli import main
    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.lm.run import load_causal_lm
    from llm_cxr.lm.tokens import add_image_tokens

    data = make_codes_dataset(tmp_path / "codes", n=16)
    base = make_base(tmp_path / "base", "neox", texts=load_dataset(data)["report"])
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "--base", str(base), "--steps", "4",
                 "--batch-size", "4", "--mixed-precision", "bf16", "--set", "max_length=256", "--set", "lora.r=4",
                 "--set", "loop.lr=1e-2"]) == 0
    loaded = load_run(out)
    start, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, start, loaded.token_map.n_codes, loaded.token_map.grid_size,
                         loaded.token_map.vqgan_fingerprint)
    ids = torch.tensor([list(m.image_ids)])
    with torch.no_grad():
        assert not torch.allclose(loaded.model.get_input_embeddings()(ids), start.get_input_embeddings()(ids))
    g = LLMCXR(loaded, vqgan=None, device="cuda")
    assert len(g.generate_report(CODES, max_new_tokens=6)) == 3


def test_vqgan_codes_on_the_gpu_match_the_cpu():
    from llm_cxr.vqgan.config import VQGANConfig
    from llm_cxr.vqgan.model import VQGAN

    torch.manual_seed(0)
    cpu = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=32, n_embed=64,
                            embed_dim=4)).eval()
    gpu = VQGAN(cpu.config).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    a, b = cpu.encode(x), gpu.encode(x).cpu()
    assert a.shape == (4, 16, 16) and (a == b).float().mean() > 0.95  # fp32 both; rare near-ties may flip
    # cuDNN convolutions run in TF32 by default: ~1e-3 apart (seen on an H100: up to 1.0e-3)
    assert torch.allclose(cpu.decode(a), gpu.decode(a).cpu(), atol=1e-2)
