"""The VQ-GAN image tokenizer: images <-> grids of discrete codes.

Module names are taming-transformers' ``VQModel`` (``encoder``, ``decoder``,
``quantize.embedding``, ``quant_conv``, ``post_quant_conv``): checkpoint keys are a
contract. Weights are saved as safetensors beside a JSON config; loading goes through
:func:`load_state_dict_checked`, which drops named prefixes, applies named converters and
then loads strictly, with an error naming expected and found shapes on any mismatch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.vqgan.config import VQGANConfig
from llm_cxr.vqgan.modules import Decoder, Encoder
from llm_cxr.vqgan.quantize import VectorQuantizer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, "VQGAN"], StateDict]


class VQGANOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) reconstruction in about [-1, 1]
    qloss: torch.Tensor  # scalar codebook + commitment loss
    indices: torch.Tensor  # (B, h, w) codes
    perplexity: torch.Tensor  # scalar codebook perplexity of the batch
    latent: torch.Tensor  # (B, D, h, w) encoder output before quantization


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta, config.legacy_beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    # ---- the model ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQGANOutput:
        h = self.quant_conv(self.encoder(x))
        q = self.quantize(h)
        recon = self.decoder(self.post_quant_conv(q.quant))
        return VQGANOutput(recon, q.loss, q.indices, q.perplexity, h)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode(self, images) -> torch.Tensor:
        """Images (tensor (B, C, H, W) in [-1, 1], PIL images or uint8 arrays) -> codes (B, h, w)."""
        x = self.to_tensor(images) if not isinstance(images, torch.Tensor) else images
        self._check_input(x)
        with torch.inference_mode():
            x = x.to(self.device, self.quant_conv.weight.dtype).contiguous(memory_format=self._memory_format)
            h = self.quant_conv(self.encoder(x))
            b, d, gh, gw = h.shape
            with torch.autocast(device_type=h.device.type, enabled=False):
                return self.quantize.nearest(h.permute(0, 2, 3, 1).reshape(-1, d).float()).view(b, gh, gw)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) or (B, h*w) -> images (B, C, H, W), clamped to [-1, 1]."""
        codes = torch.as_tensor(codes)
        g = self.config.grid_size
        if codes.dim() == 2:
            if codes.shape[1] != g * g:
                raise InputError(f"a code sequence must have {g * g} codes ({g}x{g} grid), got {codes.shape[1]}")
            codes = codes.view(-1, g, g)
        if codes.dim() != 3 or codes.shape[1:] != (g, g):
            raise InputError(f"codes must have shape (B, {g}, {g}) or (B, {g * g}); got {tuple(codes.shape)}")
        with torch.inference_mode():
            z = self.quantize.lookup(codes.to(self.device)).to(self.quant_conv.weight.dtype)
            z = z.contiguous(memory_format=self._memory_format)
            return self.decoder(self.post_quant_conv(z)).clamp(-1, 1).contiguous()

    _channels_last = False

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self._channels_last else torch.contiguous_format

    def channels_last(self) -> "VQGAN":
        """Use the channels-last layout for inference: faster convolutions on CPUs (oneDNN) and GPUs;
        results agree with the default layout up to float rounding (about 1e-6)."""
        self._channels_last = True
        return self.to(memory_format=torch.channels_last)

    def _check_input(self, x: torch.Tensor) -> None:
        c, r = self.config.in_channels, self.config.resolution
        if x.dim() != 4 or x.shape[1] != c:
            raise InputError(f"images must be (B, {c}, H, W) tensors, got shape {tuple(x.shape)}")
        f = self.config.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise InputError(f"image height and width must be multiples of {f}, got {tuple(x.shape[2:])} "
                             f"(the model was trained at {r}x{r})")

    # ---- images <-> tensors ------------------------------------------------------------------
    def to_tensor(self, images: Iterable, resize: str = "warn") -> torch.Tensor:
        """PIL images or uint8 arrays -> (B, C, R, R) float in [-1, 1], converted as the model needs.

        ``resize``: "warn" resizes images of another size with a warning, "error" refuses them,
        "silent" resizes quietly.
        """
        from llm_cxr.vqgan.data import image_to_array, to_unit_range

        r, c = self.config.resolution, self.config.in_channels
        arrays = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            if not isinstance(im, Image.Image):
                raise InputError(f"image {i}: expected a PIL image or uint8 array, got {type(im).__name__}")
            arrays.append(image_to_array(im, r, c, resize, name=f"image {i}"))
        if not arrays:
            raise InputError("no images given")
        return to_unit_range(torch.from_numpy(np.stack(arrays)))

    @staticmethod
    def to_pil(x: torch.Tensor) -> list[Image.Image]:
        """(B, C, H, W) in [-1, 1] -> PIL images (L for one channel, RGB for three)."""
        a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(im[0]) if im.shape[0] == 1 else Image.fromarray(im.transpose(1, 2, 0)) for im in a]

    # ---- saving and loading ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save

        from llm_cxr.files import save_atomic

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_atomic(path / WEIGHTS_FILE, lambda f: f.write(save(state)))
        self.config.save(path / CONFIG_FILE)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VQGAN":
        """Load a model folder (config.json + model.safetensors), or a training run's folder."""
        from safetensors.torch import load_file

        from llm_cxr.configs import check_finished

        path = Path(path)
        if (path / "model" / CONFIG_FILE).exists():  # a training run: RUN/model/
            path = path / "model"
        check_finished(path, "VQ-GAN")
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / f).exists():
                raise ConfigError(f"{path} is not a VQ-GAN model folder: {f} is missing "
                                  f"(train one with `llm-cxr vqgan train` "
                                  f"or convert one with `llm-cxr vqgan import-taming`)")
        model = cls(VQGANConfig.load(path / CONFIG_FILE))
        load_state_dict_checked(model, load_file(str(path / WEIGHTS_FILE)), source=str(path / WEIGHTS_FILE))
        return model.to(device).channels_last().eval()


def load_state_dict_checked(model: nn.Module, state: StateDict, source: str,
                            drop_prefixes: Sequence[str] = (), converters: Sequence[Converter] = ()) -> list[str]:
    """Drop ``drop_prefixes``, apply ``converters``, then load strictly. Returns the dropped keys.

    A missing or unexpected key, or a shape mismatch, is a :class:`ConfigError` that names the
    expected and found values (usually: the config does not match the weights).
    """
    dropped = [k for k in state if any(k.startswith(p) for p in drop_prefixes)]
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    if dropped:
        log.info("%s: dropped %d keys with prefixes %s", source, len(dropped), list(drop_prefixes))
    for conv in converters:
        state = conv(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ConfigError(f"{source}: weights do not match the config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return dropped
