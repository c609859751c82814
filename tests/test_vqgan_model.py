"""The VQ-GAN against taming-transformers' reference modules, checkpoint loading, bad input."""

import pickle

import pytest
import torch
import yaml

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.vqgan import VQGAN, VQGANConfig, load_taming, preset
from llm_cxr.vqgan.taming import read_checkpoint_state

# taming's GroupNorm has 32 groups; attention at 16 px exercises AttnBlock in every part.
PARITY_CFG = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=32,
                  resolution=32, in_channels=3, out_ch=3, n_embed=64, embed_dim=16, norm_groups=32)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = VQGAN(VQGANConfig(**{**PARITY_CFG, **over}))
    # random non-trivial weights everywhere (GroupNorm affine too)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        m.quantize.embedding.weight.normal_(0, 0.5)
    return m.eval()


def _taming_yaml(path, cfg: VQGANConfig):
    dd = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()
          if k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                   "in_channels", "out_ch", "dropout", "double_z")}
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": dd,
                                "lossconfig": {
                                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_parity_with_taming_reference_modules():
    pytest.importorskip("einops")
    tm = pytest.importorskip("taming.modules.diffusionmodules.model")
    from taming.modules.vqvae.quantize import VectorQuantizer2

    ours = _model()
    cfg = ours.config
    dd = dict(ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, dropout=0.0, in_channels=cfg.in_channels,
              resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=False)
    enc, dec = tm.Encoder(**dd).eval(), tm.Decoder(**dd).eval()
    vq = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=0.25, sane_index_shape=True)
    sd = ours.state_dict()
    # strict loads: our key names are taming's
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}, strict=True)
    vq.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("quantize.")}, strict=True)

    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ours.quant_conv(enc(x))
        zq, ref_loss, (_, _, ref_idx) = vq(h)
        ref_rec = dec(ours.post_quant_conv(zq))
        out = ours(x)
    codes = ours.encode(x)
    assert torch.equal(codes, ref_idx) and torch.equal(out.indices, ref_idx)
    assert len(codes.unique()) > 3  # a meaningful comparison, not one code everywhere
    assert (out.recon - ref_rec).abs().max().item() <= 1e-5
    assert torch.allclose(out.qloss, ref_loss, atol=1e-6)
    assert (ours.decode(codes) - ref_rec.clamp(-1, 1)).abs().max().item() <= 1e-5


class HParams:  # an arbitrary class: weights_only=True refuses it, our reader stubs it
    def __init__(self):
        self.lr = 1e-4


def test_taming_checkpoint_loads_strictly_and_drops_loss(tmp_path):
    src = _model(seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(2)

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": HParams()}, ckpt, pickle_module=pickle)
    cfg_path = _taming_yaml(tmp_path / "model.yaml", src.config)
    loaded = load_taming(cfg_path, ckpt)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), src.encode(x))
    out = loaded.save_pretrained(tmp_path / "ours")
    again = VQGAN.from_pretrained(out)  # channels-last layout: same codes, same images up to rounding
    assert torch.equal(again.encode(x), src.encode(x))
    assert torch.allclose(again.decode(again.encode(x)), src.decode(src.encode(x)), atol=1e-5)


def test_rgb_checkpoint_into_grayscale_model(tmp_path):
    src = _model(seed=2)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    gray = load_taming(_taming_yaml(tmp_path / "m.yaml", src.config), ckpt, grayscale=True)
    assert gray.config.in_channels == 1 and gray.config.out_ch == 1
    g = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        rgb_out = src(g.repeat(1, 3, 1, 1))
        gray_out = gray(g)
    assert torch.equal(gray_out.indices, rgb_out.indices)
    assert torch.allclose(gray_out.recon, rgb_out.recon.mean(1, keepdim=True), atol=1e-5)


def test_mismatched_config_names_expected_and_found(tmp_path):
    src = _model()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    other = VQGANConfig(**{**PARITY_CFG, "n_embed": 128})
    with pytest.raises(ConfigError, match=r"quantize.embedding.weight: expected \(128, 16\), found \(64, 16\)"):
        load_taming(_taming_yaml(tmp_path / "m.yaml", other), ckpt)
    with pytest.raises(InputError, match="does not exist"):
        read_checkpoint_state(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint_state(tmp_path / "junk.ckpt")


def test_codes_validation_and_shapes():
    m = VQGAN(preset("tiny")).eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    codes = m.encode(x)
    g = m.config.grid_size
    assert codes.shape == (2, g, g) and codes.dtype == torch.int64
    assert m.decode(codes).shape == (2, 1, 64, 64)
    assert m.decode(codes.view(2, g * g)).shape == (2, 1, 64, 64)
    k = m.config.n_embed
    with pytest.raises(InputError, match=rf"\[0, {k - 1}\]"):
        m.decode(torch.full((1, g, g), k))
    with pytest.raises(InputError, match=f"must have {g * g} codes"):
        m.decode(torch.zeros(1, g * g - 1, dtype=torch.long))
    with pytest.raises(InputError, match=r"\(B, 1, H, W\)"):
        m.encode(torch.zeros(1, 3, 64, 64))


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="not divisible by the downsampling factor"):
        VQGANConfig(resolution=100, ch_mult=(1, 2, 2, 4))
    with pytest.raises(ConfigError, match="unknown VQ-GAN config keys"):
        VQGANConfig.from_dict({"ch": 32, "colour": 1})
    with pytest.raises(ConfigError, match="unknown VQ-GAN preset"):
        preset("huge")
    assert preset("small").grid_size == 16 and preset("llm-cxr-256").num_codes_per_image == 256
