"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric", CVPR 2018), the perceptual loss taming-transformers trains with.

No weights ship with llm-cxr and none are downloaded: the user supplies two files,
- the ImageNet VGG16 weights in torchvision's layout (``vgg16-397923af.pth``: keys
  ``features.N.weight``/``bias``), and
- LPIPS' linear calibration layers (``lpips`` package ``weights/v0.1/vgg.pth``: keys
  ``linK.model.1.weight``, K = 0..4).
The network is built here in plain PyTorch (no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llm_cxr.errors import ConfigError

# VGG16 "features": conv layer indices and output channels; LPIPS taps relu1_2 .. relu5_3.
_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
          (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
_POOLS = (4, 9, 16, 23)
_TAPS = (3, 8, 15, 22, 29)  # indices of the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Distance (B,) between images in [-1, 1], grayscale (repeated to RGB) or RGB."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        convs = {i: (cin, cout) for i, cin, cout in _CONVS}
        for i in range(30):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], 3, 1, 1))
            elif i in _POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> "LPIPS":
        model = cls()
        vgg = _read(vgg_path, "VGG16")
        lin = _read(lin_path, "LPIPS linear layers")
        state = {}
        for i, cin, cout in _CONVS:
            for part, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
                key = f"features.{i}.{part}"
                if key not in vgg or tuple(vgg[key].shape) != shape:
                    found = tuple(vgg[key].shape) if key in vgg else "missing"
                    raise ConfigError(f"{vgg_path}: {key} expected {shape}, found {found} "
                                      f"(is this torchvision's vgg16 state dict?)")
                state[key] = vgg[key]
        for k, c in enumerate(_TAP_CHANNELS):
            key = f"lin{k}.model.1.weight"
            if key not in lin or tuple(lin[key].shape) != (1, c, 1, 1):
                found = tuple(lin[key].shape) if key in lin else "missing"
                raise ConfigError(f"{lin_path}: {key} expected (1, {c}, 1, 1), found {found} "
                                  f"(is this lpips' weights/v0.1/vgg.pth?)")
            state[f"lins.{k}.weight"] = lin[key]
        model.load_state_dict({**model.state_dict(), **state}, strict=True)
        return model

    def train(self, mode: bool = True) -> "LPIPS":  # always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        h = torch.cat([(x - self.shift) / self.scale, (y - self.shift) / self.scale])
        total = x.new_zeros(x.shape[0])
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                a, b = h.chunk(2)
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[k]((a - b).pow(2)).mean((1, 2, 3))
                k += 1
        return total


def _read(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} weights {path} do not exist "
                          f"(LPIPS needs both files supplied; nothing is downloaded)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise ConfigError(f"cannot read {what} weights {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds {type(obj).__name__}, not a state dict of {what} weights")
    return obj


def lpips_loss(net: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS over the batch, computed in fp32 (its unit normalisation is precision-sensitive)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return net(x.float(), y.float()).mean()


__all__ = ["LPIPS", "lpips_loss"]
