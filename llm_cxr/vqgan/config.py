"""VQ-GAN configuration: a typed mirror of taming-transformers' ``ddconfig`` plus the codebook.

Esser, Rombach and Ommer, "Taming Transformers for High-Resolution Image Synthesis",
CVPR 2021. The field names are taming's, so a taming ``.yaml`` maps onto this one to one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm_cxr.configs import from_dict_strict
from llm_cxr.errors import ConfigError
from llm_cxr.files import write_atomic


@dataclass
class VQGANConfig:
    # taming's ddconfig
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    resolution: int = 128
    in_channels: int = 1
    out_ch: int = 1
    dropout: float = 0.0
    double_z: bool = False
    # codebook
    n_embed: int = 1024
    embed_dim: int = 64
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = True  # taming's default: beta applied to the codebook term (its documented bug)
    # ours: GroupNorm groups (taming fixes 32; small presets need fewer)
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        problems = []
        if self.ch <= 0 or not self.ch_mult or min(self.ch_mult) <= 0:
            problems.append(f"ch ({self.ch}) and ch_mult ({self.ch_mult}) must be positive")
        for name in ("num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch", "n_embed",
                     "embed_dim", "norm_groups"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.in_channels not in (1, 3) or self.out_ch not in (1, 3):
            problems.append(f"in_channels/out_ch must be 1 (grayscale) or 3 (RGB), "
                            f"got {self.in_channels}/{self.out_ch}")
        if self.resolution % self.downsample_factor:
            problems.append(f"resolution {self.resolution} is not divisible by the downsampling factor "
                            f"{self.downsample_factor} (2**(len(ch_mult)-1))")
        if self.double_z:
            problems.append("double_z=True is the KL autoencoder's setting; a VQ-GAN needs double_z=False")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                problems.append(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ConfigError("invalid VQ-GAN config: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: codes per image = grid_size ** 2."""
        return self.resolution // self.downsample_factor

    @property
    def num_codes_per_image(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "VQGANConfig":
        return from_dict_strict(cls, d, "VQ-GAN config", source)

    def fingerprint(self) -> str:
        """A short hash of everything that decides what a code means (checked by the LM run)."""
        keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                "in_channels", "out_ch", "n_embed", "embed_dim", "norm_groups")
        d = {k: self.to_dict()[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")  # rewritten at every checkpoint

    @classmethod
    def load(cls, path: str | Path) -> "VQGANConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read VQ-GAN config {path}: {e}") from e
        return cls.from_dict(d, source=str(path))


# Presets: tiny and small train on a 2-core CPU; llm-cxr-256 is the published model. small and llm-cxr-256 use
# taming's 32 GroupNorm groups, so taming's own code can load their checkpoints (tiny has 8).
PRESETS: dict[str, VQGANConfig] = {
    # 64 px, f=4 -> 16x16 = 256 codes: the demo's (8x8 codes kept too little to read findings from; 16 channels
    # keep it fast: benchmarks/results/2026-12-06-demo-recipe.md)
    "tiny": VQGANConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=64,
                        resolution=64, n_embed=512, embed_dim=32, norm_groups=8),
    # 128 px, f=8 -> 16x16 = 256 codes, like LLM-CXR's 256 image tokens
    "small": VQGANConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=64,
                         resolution=128, n_embed=512, embed_dim=32, norm_groups=32),
    # LLM-CXR's published architecture: taming's ImageNet f16-1024 config, 256 px, 16x16 codes, RGB
    "llm-cxr-256": VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                               z_channels=256, resolution=256, in_channels=3, out_ch=3, n_embed=1024,
                               embed_dim=256, norm_groups=32),
}


def preset(name: str) -> VQGANConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown VQ-GAN preset {name!r}; choose one of {sorted(PRESETS)} or give a YAML/JSON file")
    return VQGANConfig.from_dict(PRESETS[name].to_dict())
