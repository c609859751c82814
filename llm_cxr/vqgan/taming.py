"""Load taming-transformers VQ-GAN checkpoints (``.yaml`` + Lightning ``.ckpt``).

LLM-CXR's tokenizer and taming's published models come in this format. The checkpoint is
read without executing pickled code: a restricted unpickler rebuilds tensors and plain
containers and replaces every other object (Lightning callbacks, OmegaConf hyper-parameters,
optimizer classes) with an inert stub. Then :func:`load_state_dict_checked` drops the
``loss.*`` weights (LPIPS and discriminator), applies converters, and loads strictly.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.vqgan.config import VQGANConfig
from llm_cxr.vqgan.model import VQGAN, StateDict, load_state_dict_checked

log = logging.getLogger(__name__)

DROP_PREFIXES = ("loss.",)
_SUPPORTED_TARGETS = ("taming.models.vqgan.VQModel", "taming.models.vqgan.VQSegmentationModel")


def read_taming_config(path: str | Path) -> VQGANConfig:
    """A taming ``model:`` YAML -> :class:`VQGANConfig`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read taming config {path}: {e}") from e
    try:
        model = doc["model"]
        params = model["params"]
        dd = dict(params["ddconfig"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: expected model.params.ddconfig in a taming-transformers config "
                          f"({e} missing)") from e
    target = model.get("target", "")
    if target and target not in _SUPPORTED_TARGETS:
        raise ConfigError(f"{path}: model target {target!r} is not supported; llm-cxr loads {_SUPPORTED_TARGETS[0]}")
    if params.get("remap"):
        raise ConfigError(f"{path}: codebook remapping (remap={params['remap']!r}) is not supported")
    known = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
             "in_channels", "out_ch", "dropout", "double_z"}
    ignored = sorted(set(dd) - known)
    if ignored:
        log.info("%s: ignoring ddconfig keys %s", path, ignored)
    cfg = {k: dd[k] for k in known if k in dd}
    try:
        return VQGANConfig(**cfg, n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), norm_groups=32)
    except KeyError as e:
        raise ConfigError(f"{path}: model.params lacks {e}") from e


class _Stub:
    """Stands in for any pickled object that is not a tensor or plain container."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"), ("torch", "IntStorage"), ("torch", "ByteStorage"), ("torch", "BoolStorage"),
    ("torch", "DoubleStorage"), ("torch.storage", "UntypedStorage"), ("torch", "float32"), ("torch", "float16"),
    ("torch", "bfloat16"), ("torch", "int64"), ("torch", "Size"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return _Stub


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    # torch's legacy (non-zip) reader calls ``pickle_module.load`` for its header before it builds an Unpickler:
    # that call must be restricted too, or a crafted header runs code before any check
    return _RestrictedUnpickler(file, **kwargs).load()


_restricted_pickle = SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                     __name__="restricted_pickle")


def read_checkpoint_state(path: str | Path) -> StateDict:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict), code-free."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
            raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no state_dict of tensors (found {type(obj).__name__})")
    return dict(state)


def rgb_to_gray(state: StateDict, model: VQGAN) -> StateDict:
    """Converter: an RGB checkpoint into a grayscale model (gray = equal R, G, B).

    The encoder's first conv sees the same value on each input channel, so its weights are
    summed over them; the decoder's last conv is averaged over its three outputs.
    """
    want_in, want_out = model.config.in_channels, model.config.out_ch
    state = dict(state)
    w = state.get("encoder.conv_in.weight")
    if w is not None and w.shape[1] == 3 and want_in == 1:
        state["encoder.conv_in.weight"] = w.sum(1, keepdim=True)
    w, b = state.get("decoder.conv_out.weight"), state.get("decoder.conv_out.bias")
    if w is not None and w.shape[0] == 3 and want_out == 1:
        state["decoder.conv_out.weight"] = w.mean(0, keepdim=True)
        state["decoder.conv_out.bias"] = b.mean(0, keepdim=True)
    return state


def load_taming(config_path: str | Path, ckpt_path: str | Path, grayscale: bool = False) -> VQGAN:
    """Build a :class:`VQGAN` from a taming config and load its checkpoint strictly."""
    cfg = read_taming_config(config_path)
    converters = []
    if grayscale and (cfg.in_channels == 3 or cfg.out_ch == 3):
        cfg = VQGANConfig.from_dict({**cfg.to_dict(), "in_channels": 1, "out_ch": 1})
        converters.append(rgb_to_gray)
    model = VQGAN(cfg)
    dropped = load_state_dict_checked(model, read_checkpoint_state(ckpt_path), source=str(ckpt_path),
                                      drop_prefixes=DROP_PREFIXES, converters=converters)
    log.info("loaded %s (%d loss.* keys dropped)", ckpt_path, len(dropped))
    return model.eval()


def import_taming(config_path: str | Path, ckpt_path: str | Path, out: str | Path, grayscale: bool = False) -> Path:
    """Convert a taming checkpoint into an llm-cxr model folder (safetensors + JSON)."""
    return load_taming(config_path, ckpt_path, grayscale=grayscale).save_pretrained(out)
