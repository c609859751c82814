"""The add-ons (llm_cxr/lm/addons): the position table and its slots, the image reader, the image plan; saving, loading,
merging, and incremental decoding."""

import pytest
import torch
from safetensors.torch import load_file
from test_modeling import GRID, N_CODES, make_base

from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import addon_file, load_addon, record, save_addon
from llm_cxr.lm.addons.plan import ImagePlan
from llm_cxr.lm.addons.positions import (
    attach,
    find,
    sincos_2d,
)
from llm_cxr.lm.addons.reader import CodeReader
from llm_cxr.lm.generation import LLMCXR, Sampling
from llm_cxr.lm.run import GuidedModes, RunInfo, load_causal_lm, load_run, merge_run, save_model
from llm_cxr.lm.sequence import ImageInputs, image_slots
from llm_cxr.lm.tokens import add_image_tokens
from llm_cxr.train.addons import pretrain_reader
from llm_cxr.train.lora import LoraSettings, apply_lora


def _map(tmp_path):
    model, tok = load_causal_lm(str(make_base(tmp_path / "base")))
    return model, tok, add_image_tokens(tok, model, N_CODES, GRID, "fp")


def test_slots_count_inside_each_image_span(tmp_path):
    _, _, m = _map(tmp_path)
    img = [m.first_id + c for c in (3, 3, 0, 15)]
    ids = torch.tensor([[7, m.begin_id, *img, m.end_id, 8, m.begin_id, *img[:2]],
                        [m.begin_id, *img, m.end_id, 9, 9, 9, 9, 9]])
    assert image_slots(ids, m).tolist() == [[-1, -1, 0, 1, 2, 3, -1, -1, -1, 0, 1],
                                                     [-1, 0, 1, 2, 3, -1, -1, -1, -1, -1, -1]]


def test_sincos_table_has_distinct_rows():
    t = sincos_2d(16, 64)
    assert t.shape == (256, 64) and abs(float(t.std()) - 1) < 1e-4
    d = torch.cdist(t, t) + torch.eye(256) * 1e9
    assert float(d.min()) > 0.1  # no two grid cells share a code


def test_positions_change_image_tokens_only_and_train_with_lora(tmp_path):
    model, tok, m = _map(tmp_path)
    model = apply_lora(model, m, LoraSettings(r=4, alpha=8, dropout=0.0))
    text = tok("No pleural effusion.")["input_ids"]
    img = [m.first_id + c for c in (1, 2, 3, 4)]
    ids = torch.tensor([text + [m.begin_id] + img + [m.end_id] + text])
    plain = model.get_input_embeddings()(ids)
    wrapper = attach(model, m)
    assert find(model) is wrapper and model.get_input_embeddings() is wrapper
    assert attach(model, m) is wrapper  # idempotent
    e = model.get_input_embeddings()(ids)
    changed = (e - plain).abs().sum(-1)[0] > 0
    assert changed.tolist() == [i in range(len(text) + 1, len(text) + 5) for i in range(ids.shape[1])]
    assert torch.allclose(e[0, len(text) + 1] - plain[0, len(text) + 1], wrapper.pos[0])

    before = wrapper.pos.detach().clone()
    assert wrapper.pos.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(wrapper.pos.detach(), before)


def test_runs_save_the_table_apart_and_reload_merge_exactly(tmp_path):
    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    model = apply_lora(model, m, LoraSettings(r=4, alpha=8, dropout=0.0))
    wrapper = attach(model, m)
    with torch.no_grad():
        wrapper.pos.normal_(0, 1.0)
    ids = torch.tensor([[5, m.begin_id] + [m.first_id + c for c in (0, 5, 9, 15)] + [m.end_id, 6]])
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    run = save_model(model, tok, m, RunInfo(kind="lora", base=str(base), vqgan=None, max_length=256), tmp_path / "r")
    assert model.get_input_embeddings() is wrapper  # saving put the wrapper back
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert not any(".base." in k or k.endswith(".pos") for k in adapter)  # peft's names stay the plain model's
    assert torch.equal(load_file(str(run / addon_file("positions")))["table"], wrapper.pos.detach())
    assert [a["name"] for a in RunInfo.load(run).addons] == ["positions"]
    loaded = load_run(run)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, want)
        merged = load_run(merge_run(run, tmp_path / "merged"))
        torch.testing.assert_close(merged.model(ids).logits, want, atol=1e-5, rtol=0)
    assert find(merged.model) is not None

    # a run without the table loads without it, and re-saving without it removes a stale file
    plain, ptok = load_causal_lm(str(base))
    pm = add_image_tokens(ptok, plain, N_CODES, GRID, "fp")
    save_model(plain, ptok, pm, RunInfo(kind="full", base=str(base), vqgan=None, max_length=256), run)
    assert not (run / addon_file("positions")).exists() and find(load_run(run).model) is None


def test_incremental_image_decoding_sees_the_same_slots_as_a_full_forward(tmp_path, monkeypatch):
    """Greedy image tokens generated one at a time (KV cache, explicit slots) are the argmax of one full
    forward pass over the finished sequence: the slots agree, so training and decoding agree."""
    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    wrapper = attach(model, m)
    torch.manual_seed(0)
    with torch.no_grad():
        wrapper.pos.normal_(0, 3.0)  # large, so a wrong slot changes the choice
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run = save_model(model, tok, m, RunInfo(kind="full", base=str(base), vqgan=None, max_length=256), tmp_path / "r")
    gen = LLMCXR(load_run(run), vqgan=None, autocast=False)
    prompt = [5, 6, 7, m.begin_id]
    out = gen._decode([prompt], GRID * GRID, gen._image_mask, Sampling(), False, image_span=True)[0].tolist()
    full = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = gen.model(full).logits[0] + gen._image_mask
    want = logits[len(prompt) - 1:len(prompt) - 1 + GRID * GRID].argmax(-1).tolist()
    assert out == want
    # with every generated token in slot 0 the image differs: the slots matter
    monkeypatch.setattr(ImageInputs, "drawing", classmethod(lambda cls, ids, slot, layout=None: cls(
        torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool))))
    wrong = gen._decode([prompt], GRID * GRID, gen._image_mask, Sampling(), False, image_span=True)[0].tolist()
    assert wrong != out


# --------------------------------------------------------------------------- the image reader (CodeReader)


def _reader(dim, seed=0, summary=False):
    torch.manual_seed(seed)
    reader = CodeReader(torch.randn(N_CODES, 8), GRID, dim, width=8, features=8, summary=summary)
    with torch.no_grad():
        reader.proj.weight.normal_(0, 1.0)
    return reader


def test_reader_adds_features_to_whole_prompt_images_only(tmp_path):
    model, tok, m = _map(tmp_path)
    wrapper = attach(model, m)
    codes = [(3 + 7 * i) % N_CODES for i in range(GRID * GRID)]
    img = [m.first_id + c for c in codes]
    ids = torch.tensor([[7, m.begin_id, *img, m.end_id, 8, m.begin_id, *img[:-1]]])
    before = wrapper(ids)
    assert attach(model, m, reader=_reader(wrapper.pos.shape[1])) is wrapper and wrapper.reader is not None
    after = wrapper(ids)
    changed = ((after - before).abs().sum(-1)[0] > 0).tolist()
    # the whole image (slots 0..15) gets features; the unfinished second image (being generated) does not
    assert changed == [i in range(2, 2 + GRID * GRID) for i in range(ids.shape[1])]
    want = wrapper.reader(torch.tensor([codes]))[0]
    torch.testing.assert_close(after[0, 2:2 + GRID * GRID] - before[0, 2:2 + GRID * GRID], want)
    # while training, an image in the response is the model's own output: the reader must not see it
    torch.testing.assert_close(wrapper(ids, ImageInputs.of(ids, m, n_prompt=torch.tensor([1]))), before)
    assert torch.equal(wrapper(ids), after)  # nothing was kept from that call
    # a decoding step (one drawn code at a time) never uses the reader
    step = wrapper(ids[:, 3:4], ImageInputs.drawing(ids[:, 3:4], 1))
    torch.testing.assert_close(step, before[:, 3:4])


def test_reader_summary_goes_on_the_closing_image_token_only(tmp_path):
    model, tok, m = _map(tmp_path)
    wrapper = attach(model, m)
    codes = [(5 + 3 * i) % N_CODES for i in range(GRID * GRID)]
    img = [m.first_id + c for c in codes]
    ids = torch.tensor([[7, m.begin_id, *img, m.end_id, 8, 9, m.begin_id, *img[:2], 4],
                        [7, 7, m.begin_id, *img, 8, 9, 9, 9, 9, 9]])  # row 1: no </image> after the codes
    before = wrapper(ids)
    reader = _reader(wrapper.pos.shape[1], summary=True)
    attach(model, m, reader=reader)
    after = wrapper(ids)
    feats, summary = reader.read(torch.tensor([codes]))
    hw = GRID * GRID
    delta = after - before
    torch.testing.assert_close(delta[0, 2:2 + hw], feats[0])
    torch.testing.assert_close(delta[0, 2 + hw], summary[0])
    changed = (delta.abs().sum(-1) > 0).tolist()
    assert changed[0] == [i in range(2, 3 + hw) for i in range(ids.shape[1])]
    assert changed[1] == [i in range(3, 3 + hw) for i in range(ids.shape[1])]
    # while training, the image the model generates is not read, so it gets no summary either
    drawn = ImageInputs.of(ids, m, n_prompt=torch.tensor([1, ids.shape[1]]))
    torch.testing.assert_close(wrapper(ids, drawn)[0], before[0])


def test_text_decoding_with_a_reader_summary_matches_a_full_forward(tmp_path):
    """Greedy text generated one token at a time (KV cache) after a prompt image read with a summary is the
    argmax of one full forward pass over the finished sequence, and the summary changes what is said."""
    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    reader = _reader(model.config.hidden_size, summary=True)
    with torch.no_grad():
        reader.sum_proj.weight.normal_(0, 3.0)
    attach(model, m, reader=reader)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run = save_model(model, tok, m, RunInfo(kind="full", base=str(base), vqgan=None, max_length=256), tmp_path / "r")
    gen = LLMCXR(load_run(run), vqgan=None, autocast=False)
    assert find(gen.model).reader.sum_proj is not None  # the summary came back with the run
    codes = [(5 + 3 * i) % N_CODES for i in range(GRID * GRID)]
    prompt = [5, m.begin_id, *[m.first_id + c for c in codes], m.end_id, 6, 7]
    out = gen._decode([prompt], 12, gen._text_mask, Sampling(), False)[0].tolist()
    with torch.no_grad():
        logits = gen.cxr(torch.tensor([prompt + out])).logits[0] + gen._text_mask
    assert out == logits[len(prompt) - 1:len(prompt) - 1 + 12].argmax(-1).tolist()
    # the summary matters: with it zeroed the same prompt decodes differently
    with torch.no_grad():
        gen._positions.reader.sum_proj.weight.zero_()
        gen._positions.reader.sum_proj.bias.zero_()
    assert gen._decode([prompt], 12, gen._text_mask, Sampling(), False)[0].tolist() != out


def test_reader_pretrains_on_labels_and_saves_with_the_run(tmp_path):
    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    reader = CodeReader(torch.randn(N_CODES, 8), GRID, model.config.hidden_size, width=8, features=8,
                                 summary=True)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, N_CODES, (64, GRID * GRID), generator=gen)
    labels = torch.stack([(codes == 3).any(1), (codes[:, 0] < 4)], 1).long()
    labels[::5, 1] = -1  # unknown: masked out
    res = pretrain_reader(reader, codes, labels, epochs=20, batch_size=16, progress=False, target_std=0.02)
    assert res["loss"] < 0.45  # learned something from the codes (chance is ~0.69)
    assert abs(float(reader(codes[:8]).std()) - 0.02) < 0.015  # proj rescaled to the requested spread
    assert abs(float(reader.read(codes[:8])[1].std()) - 0.02) < 0.015  # and so was the summary's
    attach(model, m, reader=reader)
    ids = torch.tensor([[5, m.begin_id, *(m.first_id + codes[0]).tolist(), m.end_id, 6]])
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    run = save_model(model, tok, m, RunInfo(kind="full", base=str(base), vqgan=None, max_length=256), tmp_path / "r")
    loaded = load_run(run)
    assert find(loaded.model).reader is not None
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, want)
    # a damaged file is a clear error naming it
    (run / addon_file("reader")).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=addon_file("reader")):
        load_run(run)


def test_reader_labels_drop_constant_columns_and_keep_unknowns():
    from llm_cxr.train.addons import reader_labels

    names, y = reader_labels([{"a": 1, "b": 0, "c": -1}, {"a": 0, "b": 0, "c": 1}, None, {"a": None, "c": 0}])
    assert names == ["a", "c"]
    assert y.tolist() == [[1, -1], [0, 1], [-1, -1], [-1, 0]]
    with pytest.raises(ConfigError, match="labels"):
        reader_labels([{"a": 0}, {"a": 0}])


def _plan(dim: int, rank: int = 4, seed: int = 0) -> ImagePlan:
    from llm_cxr.lm.prompts import PLAN_ITEMS

    plan = ImagePlan(PLAN_ITEMS, GRID * GRID, dim, rank=rank)
    with torch.no_grad():
        plan.maps.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return plan


def test_plan_adds_to_the_drawn_image_only_in_training_and_decoding_alike(tmp_path):
    """An image plan adds its maps to the tokens of the image being drawn: in training (the response image,
    after the prompt) and in decoding (one code at a time, its slot given) the same vectors; never to a prompt image,
    never without a plan, nothing while its maps are zero."""
    model, tok, m = _map(tmp_path)
    wrapper = attach(model, m)
    plan = ImagePlan(("pleural_effusion:left", "cardiomegaly"), GRID * GRID, wrapper.pos.shape[1], rank=4)
    assert attach(model, m, plan=plan) is wrapper and wrapper.plan is plan
    vec = plan.vector([["pleural_effusion:left", "cardiomegaly"], [], None])
    assert vec.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ConfigError, match="no map for 'pneumothorax'"):
        plan.vector([["pneumothorax"]])
    img = [m.first_id + (3 + 5 * i) % N_CODES for i in range(GRID * GRID)]
    ids = torch.tensor([[7, 8, m.begin_id, *img, m.end_id]] * 3)
    drawn = ImageInputs.of(ids, m, n_prompt=torch.full((3,), 2), plan=vec)  # the image is the response
    before = wrapper(ids)
    torch.testing.assert_close(wrapper(ids, drawn), before)  # maps start at zero: the plan adds nothing yet
    with torch.no_grad():
        plan.maps.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    trained = wrapper(ids, drawn)
    delta = trained - before
    want = plan(plan.layout(vec), torch.arange(GRID * GRID).expand(3, -1))  # (3, H*W, dim)
    torch.testing.assert_close(delta[0, 3:3 + GRID * GRID], want[0])
    assert float(delta[0, :3].abs().sum()) == 0 and float(delta[0, 3 + GRID * GRID:].abs().sum()) == 0
    assert float(delta[1:].abs().sum()) == 0  # rows without a plan
    torch.testing.assert_close(wrapper(ids), before)  # outside training a whole image is a prompt image: no plan
    prompt_image = ImageInputs.of(ids, m, plan=vec)  # a prompt image (not a response) never gets the plan
    torch.testing.assert_close(wrapper(ids, prompt_image), before)
    # incremental decoding: each generated code with its slot gets the same vector as in training
    step = wrapper(ids[:, 3:4], ImageInputs.drawing(ids[:, 3:4], 0, plan.layout(vec)))
    torch.testing.assert_close(step[:, 0], trained[:, 3])
    step = wrapper(ids[:, 5:6], ImageInputs.drawing(ids[:, 5:6], 2, plan.layout(vec)))
    torch.testing.assert_close(step[:, 0], trained[:, 5])
    bad = ImagePlan(("cardiomegaly",), GRID * GRID + 1, wrapper.pos.shape[1])
    with pytest.raises(ConfigError, match="image plan has 5 slots"):
        attach(load_causal_lm(str(make_base(tmp_path / "b2")))[0], m, plan=bad)


def test_image_decoding_with_a_plan_matches_a_full_forward_and_the_plan_saves_with_the_run(tmp_path):
    """Greedy image codes drawn one at a time under a plan are the argmax of one full training-style forward
    (response marked, same plan); the plan comes back with the run and decides what is drawn."""
    from llm_cxr.configs import IMAGE_TEMPERATURE, IMAGE_TOP_P
    from llm_cxr.lm.prompts import PLAN_INDEX

    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    attach(model, m, plan=_plan(model.config.hidden_size))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run = save_model(model, tok, m, RunInfo(kind="full", base=str(base), vqgan=None, max_length=256,
                                            guided=GuidedModes(images=True, sides=True)), tmp_path / "r")
    gen = LLMCXR(load_run(run), vqgan=None, autocast=False)
    assert torch.equal(gen._positions.plan.maps, find(model).plan.maps)
    items = ["pleural_effusion:left", "pacemaker"]
    vec = gen._positions.plan.vector([items])
    prompt = [5, 6, m.begin_id]
    out = gen._decode([prompt], GRID * GRID, gen._image_mask, Sampling(), False, image_span=True, plan=vec)[0]
    ids = torch.tensor([prompt + out.tolist() + [m.end_id]])
    with torch.no_grad():
        logits = gen.cxr(ids, image=ImageInputs.of(ids, m, torch.tensor([2]), vec)).logits[0] + gen._image_mask
    assert out.tolist() == logits[len(prompt) - 1:len(prompt) - 1 + GRID * GRID].argmax(-1).tolist()
    # generate_image gives the plan the findings it lists; other findings draw another image
    seen = []
    real = gen._decode
    gen._decode = lambda *a, **k: seen.append(k.get("plan")) or real(*a, **k)
    a = gen.generate_image(["IMPRESSION: x"], Sampling(), findings=[items]).codes
    b = gen.generate_image(["IMPRESSION: x"], Sampling(), findings=[["cardiomegaly"]]).codes
    assert seen[0][0].nonzero().squeeze(1).tolist() == sorted(PLAN_INDEX[i] for i in items)
    assert not torch.equal(a, b)
    gen.generate_image(["IMPRESSION: x"], Sampling(), findings=[items], guided=False)
    assert seen[-1] is None  # a plain drawing has no plan
    # the zone the report places a finding in is given too, from the report labeler's reading
    sampled = []
    gen._decode = lambda *a, **k: seen.append(k.get("plan")) or sampled.append(a[3]) or real(*a, **k)
    gen.generate_image(["IMPRESSION: 9 mm right upper lobe nodule."])
    assert seen[-1][0].nonzero().squeeze(1).tolist() == [PLAN_INDEX["nodule:right"], PLAN_INDEX["nodule:right@upper"]]
    assert (sampled[-1].temperature, sampled[-1].top_p) == (IMAGE_TEMPERATURE, IMAGE_TOP_P)
    # a run whose preset chose another temperature (image_temperature) draws with it, and keeps it when saved
    info = gen.run.info
    info.image_temperature = 0.0
    gen.generate_image(["IMPRESSION: x"])
    assert sampled[-1].temperature == 0.0
    # and its guidance scale (image_guidance): the unconditional branch runs only when the scale is not 1
    guided = []
    gen._decode = lambda *a, **k: guided.append((a[5] is not None, a[6])) or real(*a, **k)
    gen.generate_image(["IMPRESSION: x"])
    info.image_guidance = 1.25
    gen.generate_image(["IMPRESSION: x"])
    gen.generate_image(["IMPRESSION: x"], guidance=1.0)
    assert guided == [(False, 1.0), (True, 1.25), (False, 1.0)]
    with pytest.raises(ConfigError, match="guidance must be > 0"):
        gen.generate_image(["IMPRESSION: x"], guidance=0)
    info.save(tmp_path)
    assert (RunInfo.load(tmp_path).image_temperature, RunInfo.load(tmp_path).image_guidance) == (0.0, 1.25)


def test_a_plan_saved_with_fewer_items_loads_grown_and_draws_as_before(tmp_path):
    """Items added to PLAN_ITEMS since a run was saved (zones) load with maps at zero: the old items give the same
    vectors, the new ones nothing; items that do not continue the plan's own are a clear error."""
    from llm_cxr.lm.prompts import PLAN_ITEMS

    model, tok, m = _map(tmp_path)
    wrapper = attach(model, m)
    old = ImagePlan(PLAN_ITEMS[:76], GRID * GRID, wrapper.pos.shape[1], rank=4)
    with torch.no_grad():
        old.maps.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    attach(model, m, plan=old)
    (tmp_path / "run").mkdir()
    save_addon(old, tmp_path / "run")
    plan = load_addon(record(old), tmp_path / "run")
    assert plan.items == PLAN_ITEMS and plan.maps.shape[0] == len(PLAN_ITEMS) > 76
    slots = torch.arange(GRID * GRID).expand(2, -1)
    items = [["nodule:right", "pleural_effusion:left"], ["cardiomegaly"]]
    torch.testing.assert_close(plan(plan.layout(plan.vector(items)), slots), old(old.layout(old.vector(items)), slots))
    assert float(plan(plan.layout(plan.vector([["nodule:right@upper"]])), slots[:1]).abs().sum()) == 0
    assert old.grown(old.items) is old
    with pytest.raises(ConfigError, match="not a continuation"):
        old.grown(("cardiomegaly",) + PLAN_ITEMS)
