"""Property-based tests: whatever bytes, text or YAML tree comes in, only the project's own errors come out.

The default run tries a few dozen examples per property; ``LLM_CXR_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``
is the long pass (its counts are in benchmarks/results/).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llm_cxr.errors import LLMCXRError  # noqa: E402

LONG = int(os.environ.get("LLM_CXR_FUZZ_EXAMPLES", "0"))
QUICK = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ = settings(max_examples=LONG or 40, deadline=None, suppress_health_check=list(HealthCheck))


def _valid_images() -> dict[str, bytes]:
    from PIL import Image
    from test_images import make_dicom

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8), mode="L")
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out["dcm"] = make_dicom(Path(d) / "x.dcm", rng.integers(0, 4096, (40, 48)).astype(np.uint16)).read_bytes()
    return out


VALID = _valid_images()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b[:cut] if cut else b)


def _read(data: bytes, name: str) -> None:
    from llm_cxr.data.images import read_image_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = read_image_bytes(data, name, size=32)
            assert img.mode == "L" and img.size == (32, 32)
        except LLMCXRError:
            pass


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", ["png", "jpeg", "dcm"])
@FUZZ
@given(edits=edits, cut=st.one_of(st.none(), st.integers(1, 4000)))
def test_mutated_images_give_an_image_or_an_image_error(kind, edits, cut):
    _read(_mutate(VALID[kind], edits, cut), f"x.{kind}")


@FUZZ
@given(data=st.binary(max_size=600), name=st.sampled_from(["x.png", "x.jpg", "x.dcm", "x"]))
def test_random_bytes_give_an_image_error(data, name):
    _read(data, name)


@FUZZ
@given(text=st.text(max_size=400))
def test_labeler_reads_any_text(text):
    from llm_cxr.data.labeler import label_report

    res = label_report(text)
    assert set(res.labels) >= {"no_finding", "edema"}
    assert all(v in (None, -1, 0, 1) for v in res.labels.values())


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                     st.text(max_size=12))
_trees = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)


def _lm_keys():
    from llm_cxr.train.config import LMTrainConfig, LoopConfig, StageConfig

    return (list(LMTrainConfig.__dataclass_fields__) + ["stage", "loop", "lora"],
            list(StageConfig.__dataclass_fields__), list(LoopConfig.__dataclass_fields__))


TOP, STAGE, LOOP = _lm_keys()


@FUZZ
@given(doc=st.one_of(_trees, st.dictionaries(st.sampled_from(TOP), _trees, max_size=6),
                     st.fixed_dictionaries({"stage": st.dictionaries(st.sampled_from(STAGE), _trees, max_size=4),
                                            "loop": st.dictionaries(st.sampled_from(LOOP), _trees, max_size=4)})))
def test_any_training_yaml_is_loaded_or_named_as_a_config_error(tmp_path_factory, doc):
    from llm_cxr.train.config import load_lm_config

    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_lm_config(p, data="d", out="o")
    except LLMCXRError:
        pass


@FUZZ
@given(model=st.one_of(_trees, st.dictionaries(st.sampled_from(["ch", "ch_mult", "resolution", "n_embed",
                                                                 "embed_dim", "z_channels", "norm_groups"]),
                                               _trees, max_size=4)),
       train=st.dictionaries(st.sampled_from(["steps", "lr", "batch_size", "disc_start", "seed"]), _trees, max_size=3))
def test_any_vqgan_yaml_is_loaded_or_named_as_a_config_error(tmp_path_factory, model, train):
    from llm_cxr.vqgan.train import load_train_config

    d = tmp_path_factory.mktemp("vq")
    p = d / "c.yaml"
    p.write_text(yaml.safe_dump({"model": model, **train}))
    try:
        load_train_config(str(p), out=str(d / "out"))
    except LLMCXRError:
        pass


@QUICK
@given(ids=st.lists(st.integers(-5, 600), max_size=40), codes=st.lists(st.integers(-5, 70), max_size=40))
def test_token_map_takes_any_ids_and_codes_or_says_why(ids, codes):
    from llm_cxr.lm.tokens import ImageTokenMap

    m = ImageTokenMap(first_id=500, n_codes=64, begin_id=498, end_id=499, grid_size=4, vqgan_fingerprint="x",
                      vocab_size=564)
    for fn, arg in ((m.ids_to_codes, ids), (m.codes_to_ids, codes)):
        try:
            out = fn(torch.tensor(arg, dtype=torch.long))
            assert out.shape == (len(arg),)
        except LLMCXRError:
            pass


def test_yaml_alias_bombs_and_scalar_blocks_are_config_errors_at_once(tmp_path):
    import time

    from llm_cxr.errors import ConfigError
    from llm_cxr.train.config import load_lm_config
    from llm_cxr.vqgan.train import load_train_config

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    bomb = "\n".join(lines) + "\n"  # 9^8 leaves if expanded
    for doc, load in ((bomb + "loop: {steps: *a7}\n", lambda p: load_lm_config(p, data="d", out="o")),
                      (bomb + "model: *a7\n", lambda p: load_train_config(str(p), out=str(tmp_path / "o"))),
                      ("stage: 3\n", lambda p: load_lm_config(p, data="d", out="o", base="b")),
                      ("lora: [1, 2]\n", lambda p: load_lm_config(p, data="d", out="o", base="b"))):
        p = tmp_path / "c.yaml"
        p.write_text(doc)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=r"alias bomb|must be a mapping"):
            load(p)
        assert time.perf_counter() - t0 < 5
