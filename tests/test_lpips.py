"""LPIPS from user-supplied weight files (random weights in the published layouts here)."""

import pytest
import torch
import yaml

from llm_cxr.errors import ConfigError
from llm_cxr.vqgan.lpips import _CONVS, _TAP_CHANNELS, LPIPS


def _write_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in _CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has the classifier too
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(_TAP_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return tmp_path / "vgg16.pth", tmp_path / "lin.pth"


def test_lpips_is_a_distance_on_gray_and_rgb(tmp_path):
    net = LPIPS.from_files(*_write_weights(tmp_path))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert net(x, x).abs().max() < 1e-6
    d1, d2 = net(x, y), net(x, (x + 0.6 * torch.randn_like(x)).clamp(-1, 1))
    assert (d1 > 0).all() and (d2 > d1).all()  # more noise, further away
    assert torch.allclose(net(x, y), net(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    assert not any(p.requires_grad for p in net.parameters())


def test_lpips_bad_files_name_the_problem(tmp_path):
    vgg, lin = _write_weights(tmp_path)
    with pytest.raises(ConfigError, match="do not exist"):
        LPIPS.from_files(tmp_path / "nope.pth", lin)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "badlin.pth")
    with pytest.raises(ConfigError, match=r"lin0.model.1.weight expected \(1, 64, 1, 1\)"):
        LPIPS.from_files(vgg, tmp_path / "badlin.pth")


def test_training_with_lpips(tmp_path):
    from test_vqgan_train import MICRO, make_dataset

    from llm_cxr.cli import main

    vgg, lin = _write_weights(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": MICRO, "steps": 2, "batch_size": 4, "log_every": 1,
                                   "lpips_vgg": str(vgg), "lpips_lin": str(lin)}))
    data = make_dataset(tmp_path / "ds")
    assert main(["-q", "vqgan", "train", "--data", str(data), "--config", str(cfg), "--out", str(tmp_path / "r")]) == 0
    with pytest.raises(ConfigError, match="both lpips_vgg and lpips_lin"):
        from llm_cxr.vqgan.train import VQGANTrainConfig

        VQGANTrainConfig(data="d", out="o", lpips_vgg=str(vgg))
