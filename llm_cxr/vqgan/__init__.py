"""Image tokenizer: a VQ-GAN (Esser et al., CVPR 2021) that turns chest X-rays into code grids and back.

Knows nothing about language models. ``VQGAN.from_pretrained(path)``, ``.encode(images) ->
codes (B, h, w)``, ``.decode(codes) -> images``; taming-transformers checkpoints load
through :func:`load_taming`.
"""

from llm_cxr.vqgan.config import PRESETS, VQGANConfig, preset
from llm_cxr.vqgan.model import VQGAN, VQGANOutput, load_state_dict_checked
from llm_cxr.vqgan.taming import import_taming, load_taming, read_taming_config

__all__ = ["PRESETS", "VQGAN", "VQGANConfig", "VQGANOutput", "import_taming", "load_state_dict_checked",
           "load_taming", "preset", "read_taming_config"]
