"""VQ-GAN training losses (Esser et al., CVPR 2021, section 3.1).

- reconstruction: L1;
- codebook + commitment: from the quantizer;
- adversarial: a PatchGAN discriminator (Isola et al., pix2pix, CVPR 2017) with the hinge
  loss, weighted adaptively by the ratio of reconstruction and GAN gradient norms at the
  decoder's last layer, and switched on after ``disc_start`` steps;
- feature ("perceptual"/clinical) loss: distance between the features a frozen network
  computes on the input and on the reconstruction. LLM-CXR used a CXR classifier; any
  network saved with ``torch.export`` (or TorchScript) that returns a tensor or a tuple of
  feature maps can serve, e.g. the
  finding classifier this project trains.

Discriminator parameter names follow taming's ``NLayerDiscriminator`` (``main.N.*``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llm_cxr.errors import ConfigError

log = logging.getLogger(__name__)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, C, H, W) -> (B, 1, h, w) real/fake logits per patch."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def _set_eval(net: nn.Module) -> None:
    try:
        net.eval()
    except NotImplementedError:
        pass  # an exported program was captured in eval mode already and cannot switch


def edge_l1(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical pixel differences of ``x`` and ``recon``.

    The plain L1 loss weighs a structure by its area, so thin ones (a line or a tube a pixel wide, a pleural
    edge, ribs) hardly count while a short run learns the lungs' shading; their differences are as large as
    any edge's. A cheap stand-in for a perceptual loss where none is available (gradient-difference loss,
    Mathieu et al., ICLR 2016)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (recon[..., :, 1:] - recon[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (recon[..., 1:, :] - recon[..., :-1, :])
    return (dx.abs().mean() + dy.abs().mean()) / 2


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d last|| / ||d g_loss / d last||: balances reconstruction and GAN terms."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


class FeatureLoss(nn.Module):
    """Mean squared distance of unit-normalised features of a frozen network.

    ``net`` maps images in [-1, 1] (B, C, H, W) to a tensor or a list/tuple of tensors.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        _set_eval(net)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureLoss":  # the network stays frozen in eval mode
        super().train(mode)
        _set_eval(self.net)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(x), self.net(y)
        fx = fx if isinstance(fx, (list, tuple)) else [fx]
        fy = fy if isinstance(fy, (list, tuple)) else [fy]
        total = x.new_zeros(())
        for a, b in zip(fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-8)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-8)
            total = total + (a - b).pow(2).sum(1).mean()
        return total


def load_feature_net(path: str | Path) -> nn.Module:
    """A frozen feature network: a ``torch.export`` program (.pt2) or a TorchScript file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"feature network {path} does not exist")
    errors = []
    try:
        net = torch.export.load(str(path)).module()
    except Exception as e:  # noqa: BLE001 - not an exported program; try TorchScript
        errors.append(f"torch.export: {e}")
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e2:  # noqa: BLE001
            errors.append(f"TorchScript: {e2}")
            raise ConfigError(f"{path} is neither a torch.export program nor TorchScript ({'; '.join(errors)})") from e2
    log.info("feature loss on %s", path)
    return net
