"""The one forward pass (llm_cxr.lm.model.CXRModel): what decoding computed is what a teacher-forced forward
over the same sequence computes, and every token the model sees goes through the input-embedding module."""

import pytest
import torch
from test_addons import _plan, _reader
from test_modeling import GRID, N_CODES, make_base

from llm_cxr.lm.addons.positions import attach, find
from llm_cxr.lm.generation import LLMCXR, Sampling
from llm_cxr.lm.model import CXRModel
from llm_cxr.lm.run import GuidedModes, RunInfo, load_causal_lm, load_run, save_model
from llm_cxr.lm.sequence import Batch, ImageInputs
from llm_cxr.lm.tokens import add_image_tokens


def _run_with_every_addon(tmp_path):
    """A saved run with a position table, an image reader (with summary) and an image plan, all non-trivial."""
    base = make_base(tmp_path / "base")
    model, tok = load_causal_lm(str(base))
    m = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    dim = model.config.hidden_size
    attach(model, m, reader=_reader(dim, summary=True), plan=_plan(dim))
    torch.manual_seed(0)
    with torch.no_grad():
        find(model).pos.normal_(0, 1.0)
        find(model).reader.proj.weight.normal_(0, 0.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    info = RunInfo(kind="full", base=str(base), vqgan=None, max_length=256,
                   guided=GuidedModes(images=True, sides=True))
    return LLMCXR(load_run(save_model(model, tok, m, info, tmp_path / "r")), vqgan=None, autocast=False)


def test_teacher_forced_logprobs_of_a_drawn_image_equal_what_the_decoder_used(tmp_path):
    gen = _run_with_every_addon(tmp_path)
    m = gen.map
    plan = gen._positions.plan.vector([["pleural_effusion:left", "cardiomegaly"], []])  # (2, items)
    prompts = [[5, 6, 7, m.begin_id], [9, m.begin_id]]  # left-padded together, as a batch decodes
    used: list[torch.Tensor] = []
    codes = gen._decode(prompts, GRID * GRID, gen._image_mask, Sampling(temperature=1.0, seed=3), False,
                        image_span=True, plan=plan, logprobs=used)
    used = torch.stack(used, 1)  # (B, H*W)
    assert codes.shape == (2, GRID * GRID) and bool(m.is_image_id(codes).all())
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + codes[b].tolist() + [m.end_id]])
        n_prompt = torch.tensor([len(prompt) - 1])  # the response starts at <image>, as training encodes it
        image = ImageInputs.of(ids, m, n_prompt, plan[b:b + 1])
        assert int(image.drawn.sum()) == GRID * GRID and not bool(image.read.any())
        with torch.no_grad():
            lp = gen.cxr.token_logprobs(Batch(ids, torch.ones_like(ids), image), gen._image_mask)[0]
        forced = lp[len(prompt) - 1:len(prompt) - 1 + GRID * GRID]
        torch.testing.assert_close(forced, used[b], atol=2e-5, rtol=1e-4)
        # the same ids without their image inputs compute another function: the reader reads the drawn image
        # whole and the plan is dropped; that is why the inputs are explicit
        with torch.no_grad():
            plain = gen.cxr.token_logprobs(Batch(ids, torch.ones_like(ids)), gen._image_mask)[0]
        assert not torch.allclose(plain[len(prompt) - 1:len(prompt) - 1 + GRID * GRID], used[b], atol=1e-3)


def test_a_hook_on_the_input_embeddings_sees_every_decoding_step(tmp_path):
    gen = _run_with_every_addon(tmp_path)
    calls = []
    hook = gen.model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: calls.append((tuple(args[0].shape), args[1] if len(args) > 1 else None)))
    try:
        gen.generate_image(["IMPRESSION: Small left pleural effusion."], Sampling(), batch_size=1)
        drawing = [image for _, image in calls[1:]]
        assert len(calls) == GRID * GRID  # the prompt, then one call per further code
        assert all(image is not None and image.drawn.all() for image in drawing)
        assert [int(image.slots[0, 0]) for image in drawing] == list(range(GRID * GRID - 1))
        calls.clear()
        codes = torch.randint(0, N_CODES, (1, GRID * GRID))
        gen.generate_report(codes, Sampling(), max_new_tokens=5, guided=False)
        first = calls[0][1]
        assert first is not None and int(first.read.sum()) == GRID * GRID  # the prompt image is read whole
        assert len(calls) >= 2
    finally:
        hook.remove()


def test_the_forward_of_a_plain_lm_is_its_own_forward(tmp_path):
    """Without image tokens CXRModel adds nothing: the same logits as the Hugging Face model's own call."""
    model, tok = load_causal_lm(str(make_base(tmp_path / "base")))
    cxr = CXRModel(model).eval()
    ids = torch.tensor([tok("No pleural effusion. Heart size is normal.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(cxr(ids).logits, model(ids).logits)
        torch.testing.assert_close(cxr(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])
        hidden = cxr(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1


def _write_format_1(folder):
    """Rewrite a run folder the way llm-cxr saved runs before add-ons had a registry: one
    image_positions.safetensors (table, reader.*, plan.* with their configs in the metadata), the finding head in
    finding_head.safetensors, guided modes as run.json ``extra`` flags, no ``format`` and no ``addons``."""
    import json

    from safetensors.torch import load_file, save_file

    from llm_cxr.lm.addons import addon_file

    info = json.loads((folder / "run.json").read_text())
    tensors, meta = {}, {}
    for entry in info["addons"]:
        state = load_file(str(folder / addon_file(entry["name"])))
        (folder / addon_file(entry["name"])).unlink()
        cfg = entry["config"]
        if entry["name"] == "positions":
            tensors["pos"] = state["table"]
        elif entry["name"] == "finding_head":
            state["sided"] = state["sided"].to(torch.uint8)
            head_meta = {"config": json.dumps({k: v for k, v in cfg.items() if k != "metrics"}),
                         "metrics": json.dumps(cfg["metrics"])}
            save_file(state, str(folder / "finding_head.safetensors"), metadata=head_meta)
        else:
            tensors |= {f"{entry['name']}.{k}": v for k, v in state.items()}
            meta[entry["name"]] = json.dumps(cfg)
    save_file(tensors, str(folder / "image_positions.safetensors"), metadata=meta)
    guided = info.pop("guided")
    info["extra"] |= {"guided_reports": guided["reports"], "guided_vqa": guided["vqa"],
                      "guided_images": guided["images"], "guide_sides": guided["sides"]}
    del info["format"], info["addons"]
    (folder / "run.json").write_text(json.dumps(info))


def test_a_run_saved_before_the_addon_registry_loads_converted_and_computes_the_same(tmp_path):
    import shutil

    from llm_cxr.lm.addons.head import FindingHead

    gen = _run_with_every_addon(tmp_path)
    head = FindingHead(torch.randn(N_CODES, 4), GRID, ["cardiomegaly", "pleural_effusion"], width=4, features=4,
                       regions=(1, 1))
    head.metrics = {"micro_f1": 0.5}
    new = save_model(gen.model, gen.tok, gen.map, gen.run.info, tmp_path / "new", addons=[head])
    old = tmp_path / "old"
    shutil.copytree(new, old)
    _write_format_1(old)
    assert not list(old.glob("addon_*")) and (old / "image_positions.safetensors").exists()
    a, b = load_run(new), load_run(old)
    assert b.info.format == 1 and b.info.guided == a.info.guided and b.info.guided.images
    assert list(b.addons) == list(a.addons) == ["positions", "reader", "plan", "finding_head"]
    assert b.addons["finding_head"].metrics == {"micro_f1": 0.5}
    m = a.token_map
    ids = torch.tensor([[5, m.begin_id, *[m.first_id + (3 * i) % N_CODES for i in range(GRID * GRID)], m.end_id, 7]])
    with torch.no_grad():
        torch.testing.assert_close(CXRModel(b.model, m)(ids).logits, CXRModel(a.model, m)(ids).logits)
    codes = torch.randint(0, N_CODES, (3, GRID * GRID))
    assert torch.equal(b.addons["finding_head"].probabilities(codes), head.eval().probabilities(codes))
    # saving the converted run writes the current format, and nothing of the old one stays
    again = save_model(b.model, b.tokenizer, b.token_map, b.info, old, addons=[b.addons["finding_head"]])
    assert not (again / "image_positions.safetensors").exists() and not (again / "finding_head.safetensors").exists()
    assert load_run(again).info.format == 2


def _full_logits_loss(model, batch, mode):
    """The loss as computed before the output head saw only the scored positions: every position's logits."""
    logits = model(batch.input_ids, batch.attention_mask, batch.image).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    w = (target != -100).float() * (batch.weights[:, 1:] if batch.weights is not None else 1.0)
    if mode == "token":
        return (per * w).sum() / w.sum()
    n = w.sum(1)
    return ((per * w).sum(1)[n > 0] / n[n > 0]).mean()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("mode", ["token", "example"])
def test_the_loss_through_the_scored_positions_only_equals_the_full_logits_loss(tmp_path, lora, mode):
    from llm_cxr.lm.model import response_loss
    from llm_cxr.lm.sequence import collate
    from llm_cxr.train.lora import LoraSettings, apply_lora

    if lora:  # as a LoRA stage starts: image tokens, adapters with trainable image-token rows, then the add-ons
        lm, tok = load_causal_lm(str(make_base(tmp_path / "base")))
        m = add_image_tokens(tok, lm, N_CODES, GRID, "fp")
        lm = apply_lora(lm, m, LoraSettings(r=4, dropout=0.0))
        attach(lm, m, plan=_plan(lm.config.hidden_size))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn_like(p) * 0.2)  # adapters start at zero: make them matter
        model = CXRModel(lm, m)
    else:
        gen = _run_with_every_addon(tmp_path)
        m, model = gen.map, gen.cxr
    codes = [m.first_id + (i * 7) % N_CODES for i in range(GRID * GRID)]
    rows = [{"input_ids": [5, 6, 7, m.begin_id, *codes, m.end_id], "n_prompt": 3, "plan": [0, 2],
             "focus": [0, 1, 5], "focus_weight": 4.0},
            {"input_ids": [9, 10, 11, 12, 13, 14], "n_prompt": 4},
            {"input_ids": [8, 9, 10], "n_prompt": 3}]  # no response token at all
    batch = collate(rows, pad_id=0, token_map=m)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    got = response_loss(model, batch, mode)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)  # (the reader reads no image here)
    want = _full_logits_loss(model, batch, mode)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    torch.testing.assert_close(got, want)
    assert sum(g is not None for g in got_grads) > len(params) // 2
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)  # fp32 sums in another order
    assert not model.lm.get_output_embeddings()._forward_pre_hooks  # the head's temporary hook is gone


def test_only_positions_reaches_the_head_called_either_way_and_leaves_no_hook():
    from llm_cxr.lm.model import _only_positions

    head = torch.nn.Linear(4, 3)
    hidden = torch.randn(2, 5, 4)
    positions = torch.zeros(2, 5, dtype=torch.bool)
    positions[0, 1], positions[1, 3], positions[1, 4] = True, True, True
    want = head(hidden[positions]).unsqueeze(0)
    with _only_positions(head, positions):
        torch.testing.assert_close(head(hidden), want)
        torch.testing.assert_close(head(input=hidden), want)
    with pytest.raises(ValueError, match="do not match"), _only_positions(head, positions):
        head(torch.randn(2, 6, 4))
    assert not head._forward_pre_hooks and head(hidden).shape == (2, 5, 3)
