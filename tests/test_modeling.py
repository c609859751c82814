"""LoRA + trainable image-token rows, run folders (save -> load -> merge), errors, constrained generation."""

import contextlib
import json
import types

import numpy as np
import pytest
import torch

from llm_cxr.cli import main
from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.generation import LLMCXR, Sampling
from llm_cxr.lm.prompts import CHECKLIST_QUESTIONS, GUIDE_PREFIX, report_prompt, vqa_prompt
from llm_cxr.lm.run import (
    RunInfo,
    ensure_pad_token,
    load_causal_lm,
    load_run,
    merge_run,
    save_model,
    trainable_summary,
)
from llm_cxr.lm.sequence import collate, encode_prompt
from llm_cxr.lm.tokens import add_image_tokens
from llm_cxr.train.lora import LoraSettings, apply_lora, auto_lora_targets

N_CODES, GRID = 16, 2
TEXTS = ["FINDINGS: No pleural effusion or pneumothorax. The heart size is normal.\nIMPRESSION: Normal chest.",
         "FINDINGS: Small left pleural effusion. Mild cardiomegaly.\nIMPRESSION: Small left effusion.",
         "FINDINGS: Right upper lobe consolidation. No pneumothorax.\nIMPRESSION: Pneumonia."]


# --------------------------------------------------------------------------- helpers shared with test_lm_train


def make_base(path, arch="neox", texts=TEXTS, context=256, vocab=400):
    """A tiny causal LM with a tokenizer trained in-process, saved as a Hugging Face folder."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from llm_cxr.train.base import train_text_tokenizer

    tok = train_text_tokenizer(list(texts) * 5, vocab_size=vocab)
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=context, tie_word_embeddings=False, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=context, tie_word_embeddings=True, **ids))
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


def make_codes_dataset(path, n=16, fingerprint="fp", seed=0):
    """A tiny synthetic dataset with a random ``codes`` column and the ``vqgan.json`` encoding writes."""
    import datasets

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.data.synth import SynthConfig, generate_dataset

    raw = path.parent / f"{path.name}-raw"
    generate_dataset(n, raw, SynthConfig(size=64), seed=seed, progress=False)
    ds = load_dataset(raw)
    codes = np.random.default_rng(seed).integers(0, N_CODES, (len(ds), GRID * GRID)).astype(np.int16)
    ds = ds.add_column("codes", codes.tolist(),
                       feature=datasets.List(datasets.Value("int16"), length=GRID * GRID))
    ds.save_to_disk(str(path))
    write_codes_info(path, fingerprint)
    return path


def write_codes_info(path, fingerprint):
    (path / "vqgan.json").write_text(json.dumps({"model_path": None, "fingerprint": fingerprint, "weights": "w",
                                                 "n_embed": N_CODES, "grid_size": GRID, "resolution": 64,
                                                 "channels": 1}))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: make_base(root / arch, arch) for arch in ("neox", "llama")}


def _effective(model, vocab):
    """(input embedding rows, output head rows) as the model computes them, adapters included."""
    inp = model.get_input_embeddings()(torch.arange(vocab)[None])[0]
    hidden = inp.shape[-1]
    out = model.get_output_embeddings()(torch.eye(hidden)[None])[0].T  # (vocab, hidden) = W (no bias here)
    return inp.detach().clone(), out.detach().clone()


def _probe(token_map, tok):
    text = tok("FINDINGS: No pleural effusion.", add_special_tokens=False)["input_ids"]
    img = [token_map.begin_id, *token_map.image_ids, token_map.end_id]
    return torch.tensor([text + img + text[:3], img + text + text[:3]])


@pytest.fixture(scope="module", params=["neox", "llama"])
def trained(request, bases, tmp_path_factory):
    """A LoRA model (dropout 0) trained a few steps on sequences holding every image token, saved as a run."""
    base = bases[request.param]
    model, tok = load_causal_lm(str(base))
    token_map = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    probe = _probe(token_map, tok)
    with torch.no_grad():
        base_logits = model(probe).logits.clone()
    model = apply_lora(model, token_map, LoraSettings(r=4, alpha=8, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _effective(model, len(tok))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(4):
        loss = model(input_ids=probe, labels=probe).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    save_model(model, tok, token_map, RunInfo(kind="lora", base=str(base), vqgan=None, max_length=256),
               run / "model")
    return types.SimpleNamespace(arch=request.param, model=model, tok=tok, map=token_map, probe=probe,
                                 base_logits=base_logits, frozen=frozen, before=before, run=run)


# --------------------------------------------------------------------------- LoRA and image-token rows


def test_lora_trains_the_image_token_rows_of_both_embeddings_and_nothing_else(trained):
    m, tok, token_map = trained.model, trained.tok, trained.map
    new = torch.tensor(list(token_map.image_ids) + [token_map.begin_id, token_map.end_id])
    old = torch.ones(len(tok), dtype=torch.bool)
    old[new] = False
    inp0, out0 = trained.before
    inp1, out1 = _effective(m, len(tok))
    # every image/boundary row moved, in the input embeddings and in the output head
    assert ((inp1[new] - inp0[new]).abs().amax(-1) > 0).all()
    assert ((out1[new] - out0[new]).abs().amax(-1) > 0).all()
    # the text rows are exactly what they were
    assert torch.equal(inp1[old], inp0[old]) and torch.equal(out1[old], out0[old])
    if trained.arch == "llama":  # tied: the head still is the input embedding
        assert torch.equal(inp1, out1)
    else:
        assert not torch.equal(inp1[new], out1[new])
    # base weights never move
    now = dict(m.named_parameters())
    assert trained.frozen and all(torch.equal(now[n], p) for n, p in trained.frozen.items())
    # the adapters change what the model computes, on text positions too
    with torch.no_grad():
        logits = m(trained.probe).logits
    text_pos = slice(0, 5)
    assert not torch.allclose(logits[:, text_pos], trained.base_logits[:, text_pos])
    s = trainable_summary(m)
    assert 0 < s.trainable < s.total and "trainable of" in str(s)


def test_auto_targets_are_the_block_linears(bases):
    neox, _ = load_causal_lm(str(bases["neox"]))
    llama, _ = load_causal_lm(str(bases["llama"]))
    assert auto_lora_targets(neox) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert set(auto_lora_targets(llama)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    # without image tokens: LoRA only, the embeddings stay plain
    m = apply_lora(neox, None, LoraSettings(r=2, alpha=4))
    assert not any("token_adapter" in n for n, _ in m.named_parameters())


def test_unknown_lora_module_names_the_linear_layers(bases):
    model, tok = load_causal_lm(str(bases["neox"]))
    token_map = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    with pytest.raises(ConfigError, match=r"\['q_proj'\] match no linear layer.*query_key_value"):
        apply_lora(model, token_map, LoraSettings(target_modules="q_proj"))
    with pytest.raises(ConfigError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraSettings(dropout=1.0)


# --------------------------------------------------------------------------- run folders


def test_save_load_reproduces_logits_exactly_and_merge_matches(trained, tmp_path, capsys):
    with torch.no_grad():
        want = trained.model(trained.probe).logits
    loaded = load_run(trained.run)  # the run folder or its model/ subfolder
    assert loaded.info.kind == "lora" and loaded.token_map == trained.map and len(loaded.tokenizer) == len(trained.tok)
    with torch.no_grad():
        got = loaded.model(trained.probe).logits
    assert torch.equal(got, want)
    assert torch.equal(load_run(trained.run / "model").model(trained.probe).logits.detach(), want)

    merged_dir = merge_run(trained.run, tmp_path / "merged")
    merged = load_run(merged_dir)
    assert merged.info.kind == "full" and merged.info.extra["merged_from"] == str(trained.run / "model")
    assert not any("lora" in n or "token_adapter" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.model(trained.probe).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge_run(merged_dir, tmp_path / "again")

    capsys.readouterr()
    assert main(["-q", "merge", str(trained.run), "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["merged"] == str(tmp_path / "cli")
    with torch.no_grad():
        torch.testing.assert_close(load_run(tmp_path / "cli").model(trained.probe).logits, want, atol=1e-5, rtol=0)


def test_load_run_refuses_what_is_not_a_run(tmp_path, trained):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an llm-cxr language-model run"):
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps({"kind": "bitsandbytes", "base": "x", "vqgan": None}))
    trained.map.save(bad)
    trained.tok.save_pretrained(bad)
    with pytest.raises(ConfigError, match="unknown kind"):
        load_run(bad)
    (bad / "run.json").write_text('{"kind": "lora", "base": "x", "vqgan": null, "adapter": "future key"}')
    with pytest.raises(ConfigError, match="not a valid run description"):
        load_run(bad)
    (bad / "run.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="not a valid run description"):
        load_run(bad)
    # a VQ-GAN with another codebook cannot be paired with the model
    fake = types.SimpleNamespace(config=types.SimpleNamespace(n_embed=32, grid_size=GRID, fingerprint=lambda: "fp"))
    with pytest.raises(ConfigError, match="codebook size"):
        LLMCXR(load_run(trained.run), vqgan=fake)


def test_pad_token_defaults_to_eos_and_padding_is_masked_by_position():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                          show_progress=False))
    tok = ensure_pad_token(PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>"))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    a = tok("No effusion.", add_special_tokens=False)["input_ids"] + [eos]
    b = tok("Mild cardiomegaly, small left effusion.", add_special_tokens=False)["input_ids"] + [eos]
    batch = collate([{"input_ids": a, "n_prompt": 1}, {"input_ids": b, "n_prompt": 2}], pad_id=tok.pad_token_id)
    lab, ids = batch.labels, batch.input_ids
    assert lab[0, len(a) - 1] == eos and lab[1, len(b) - 1] == eos  # the real EOS is learned ...
    assert (lab[0, len(a):] == -100).all() and (ids[0, len(a):] == eos).all()  # ... the padding EOS is not
    assert (lab[0, :1] == -100).all() and (lab[1, :2] == -100).all()
    assert batch.attention_mask.sum(1).tolist() == [len(a), len(b)]

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(ConfigError, match="no EOS token"):
        ensure_pad_token(no_eos)


# --------------------------------------------------------------------------- generation


def _generator(base, run):
    """A LoRA run of a tiny base with random (as if trained) adapters, loaded without a VQ-GAN (fp32)."""
    model, tok = load_causal_lm(str(base))
    token_map = add_image_tokens(tok, model, N_CODES, GRID, "fp")
    model = apply_lora(model, token_map, LoraSettings(r=2, alpha=4))
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: image rows that differ from each other, non-zero LoRA updates
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    save_model(model, tok, token_map, RunInfo(kind="lora", base=str(base), vqgan=None, max_length=256), run)
    return LLMCXR(load_run(run), vqgan=None, autocast=False)


@pytest.fixture(scope="module")
def gen(bases, tmp_path_factory):
    return _generator(bases["neox"], tmp_path_factory.mktemp("gen-neox"))


@pytest.fixture(scope="module")
def gen_llama(bases, tmp_path_factory):
    return _generator(bases["llama"], tmp_path_factory.mktemp("gen-llama"))


def test_loading_a_lora_run_prints_no_deprecation_warning(gen):
    """peft reads a deprecated transformers property while wrapping a model; every command printed its warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        run = load_run(gen.run.folder)
    assert run.info.kind == "lora"


CODES = torch.tensor([[0, 1, 2, 3], [15, 14, 13, 12], [5, 5, 5, 5]])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_generate_image_always_gives_a_full_grid_of_valid_codes(gen, batch, guidance):
    reports = ["Small left pleural effusion.", "No acute abnormality.", ""][:batch]
    for sampling in (Sampling(), Sampling(temperature=1.5, seed=batch), Sampling(temperature=1.0, top_k=3, top_p=0.5,
                                                                                  seed=1)):
        out = gen.generate_image(reports, sampling=sampling, guidance=guidance, batch_size=2)
        assert out.codes.shape == (batch, GRID, GRID) and out.images == []
        assert int(out.codes.min()) >= 0 and int(out.codes.max()) < N_CODES
    a = gen.generate_image(reports, Sampling(temperature=1.0, seed=7), guidance)
    b = gen.generate_image(reports, Sampling(temperature=1.0, seed=7), guidance)
    assert torch.equal(a.codes, b.codes)  # a seed makes sampling reproducible


def test_decoding_computes_only_the_last_positions_logits_and_that_changes_nothing(gen, gen_llama):
    for g in (gen, gen_llama):  # LoRA runs (a PeftModel passes logits_to_keep on to the base model)
        assert g.cxr._keep_arg
        reports = ["Small left pleural effusion.", "", "No acute abnormality."]
        images = g.generate_image(reports, sampling=Sampling(), batch_size=3).codes
        texts = g.generate_report(CODES, sampling=Sampling(), max_new_tokens=10)
        g.cxr._keep_arg = False  # every position's logits, the last one sliced after
        try:
            assert torch.equal(g.generate_image(reports, sampling=Sampling(), batch_size=3).codes, images)
            assert g.generate_report(CODES, sampling=Sampling(), max_new_tokens=10) == texts
        finally:
            g.cxr._keep_arg = True


def test_default_weights_dtype_is_bf16_on_a_gpu_unless_autocast_is_chosen(monkeypatch):
    from llm_cxr.lm.generation import default_dtype

    assert default_dtype(torch.device("cpu"), None) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype(torch.device("cuda"), None) == torch.bfloat16
    assert default_dtype(torch.device("cuda"), True) is None and default_dtype(torch.device("cuda"), False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype(torch.device("cuda"), None) is None


def test_text_never_holds_image_tokens_and_stops_at_eos(gen):
    texts = gen.generate_report(CODES, sampling=Sampling(temperature=2.0, seed=0), max_new_tokens=12)
    assert len(texts) == 3 and all(isinstance(t, str) and "<img_" not in t and "<image>" not in t for t in texts)
    answers = gen.answer(CODES, ["Is there a pleural effusion?", "Which side?", "Is there a pneumothorax?"],
                         max_new_tokens=5)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert len(gen.answer(CODES[:2], "Is there cardiomegaly?", max_new_tokens=3)) == 2
    # raw ids: no image/boundary token even when the model prefers them over everything
    image_rows = list(gen.map.image_ids) + [gen.map.begin_id, gen.map.end_id]
    with _forced_logits(gen, lambda n, logits: logits[:, -1, image_rows].add_(50.0)):
        ids = gen._decode([[gen.map.begin_id, gen.map.first_id], [7]], 6, gen._text_mask, Sampling(), True)
    assert ids.shape == (2, 6) and not gen.map.is_image_id(ids).any()
    assert not ((ids == gen.map.begin_id) | (ids == gen.map.end_id)).any()
    # stopping: a model that says EOS from its 3rd forward pass on ends the loop there
    eos = gen.tok.eos_token_id
    with _forced_logits(gen, lambda n, logits: logits[:, -1, eos].fill_(1e4) if n >= 3 else None) as calls:
        ids = gen._decode([[5, 6, 7], [8, 9]], 50, gen._text_mask, Sampling(), stop_at_eos=True)
        assert ids.shape == (2, 3) and (ids[:, 2] == eos).all() and not (ids[:, :2] == eos).any()
        calls["n"] = 0
        texts = gen.generate_report(CODES[:1], max_new_tokens=50)
        assert calls["n"] == 3 and len(texts) == 1
    # answers never run past the model's context (256 positions), however many tokens are asked for
    with _forced_logits(gen, lambda n, logits: logits[:, -1, eos].fill_(float("-inf"))) as calls:
        assert len(gen.answer(CODES[:1], "Is there a pneumothorax?", max_new_tokens=100_000)) == 1
    assert calls["n"] == 256 - len(encode_prompt(gen.tok, gen.map, vqa_prompt(gen.template, "Is there a "
                                                                                "pneumothorax?"), CODES[0])[0])


@contextlib.contextmanager
def _forced_logits(gen, edit):
    """Let ``edit(call_number, logits)`` change the model's logits in place for the duration."""
    calls = {"n": 0}
    real = gen.model.forward

    def forward(*args, **kwargs):
        res = real(*args, **kwargs)
        calls["n"] += 1
        edit(calls["n"], res.logits)
        return res

    gen.model.forward = forward
    try:
        yield calls
    finally:
        del gen.model.forward


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_batched_left_padded_decoding_matches_one_at_a_time(arch, request):
    gen = request.getfixturevalue("gen" if arch == "neox" else "gen_llama")
    reports = ["Small left pleural effusion with mild cardiomegaly.", "Normal.", "No pneumothorax."]
    one = torch.cat([gen.generate_image([r], Sampling()).codes for r in reports])
    together = gen.generate_image(reports, Sampling(), batch_size=3).codes
    assert torch.equal(one, together) and len(together.unique()) > 1
    guided_one = torch.cat([gen.generate_image([r], Sampling(), guidance=3.0).codes for r in reports])
    assert torch.equal(guided_one, gen.generate_image(reports, Sampling(), guidance=3.0, batch_size=3).codes)

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    singles = [gen._decode([p], 8, gen._text_mask, Sampling(), stop_at_eos=False) for p in prompts]
    batched = gen._decode(prompts, 8, gen._text_mask, Sampling(), stop_at_eos=False)
    assert torch.equal(torch.cat(singles), batched)
    assert gen.generate_report(CODES, max_new_tokens=6) == [gen.generate_report(CODES[i:i + 1], max_new_tokens=6)[0]
                                                            for i in range(3)]


def test_guided_reports_read_the_checklist_first_and_state_its_findings(gen, monkeypatch):
    prompts, asked = [], []
    real_text = gen._text
    monkeypatch.setattr(gen, "_text", lambda p, s, n: prompts.extend(p) or real_text(p, s, n))

    def expect(findings, i):
        return encode_prompt(gen.tok, gen.map, report_prompt(gen.template, findings=findings), CODES[i].tolist())[0]

    # a run not trained for it: one pass, the plain report prompt
    assert not gen.guided_reports
    gen.generate_report(CODES[:2], max_new_tokens=3)
    assert prompts == [encode_prompt(gen.tok, gen.map, report_prompt(gen.template), CODES[i].tolist())[0]
                       for i in range(2)]
    # findings given: each image's own list goes into its prompt, in one pass
    prompts.clear()
    gen.generate_report(CODES[:2], max_new_tokens=3, findings=[["pleural_effusion", "chest_tube"], []])
    assert prompts == [expect(["pleural_effusion", "chest_tube"], 0), expect([], 1)]

    # a run trained for it: the checklist is read first, greedily even when the report is sampled
    def fake_answer(images, question, sampling=None, max_new_tokens=24, batch_size=16, guided=None):
        asked.append((question, sampling, guided))
        return ["cardiomegaly: yes; pneumothorax: no; chest tube: yes", "not a checklist"]

    monkeypatch.setattr(gen, "answer", fake_answer)
    monkeypatch.setattr(gen.run.info.guided, "reports", True)
    prompts.clear()
    texts = gen.generate_report(CODES[:2], sampling=Sampling(temperature=1.0, seed=0), max_new_tokens=3)
    assert len(texts) == 2 and asked == [(CHECKLIST_QUESTIONS[0], Sampling(), False)]  # the reading: unguided
    assert prompts == [expect(["cardiomegaly", "chest_tube"], 0), expect([], 1)]
    prompts.clear()
    gen.generate_report(CODES[:2], max_new_tokens=3, guided=False)
    assert len(asked) == 1 and "Checklist" not in gen.tok.decode(prompts[0])
    with pytest.raises(InputError, match="unknown finding names"):
        gen.generate_report(CODES[:1], findings=[["effusion"]])
    with pytest.raises(InputError, match="one per image"):
        gen.generate_report(CODES[:2], findings=[["cardiomegaly"]])


def _with_fixed_head(gen) -> LLMCXR:
    """``gen``'s run loaded with a finding head that reads cardiomegaly and a left pleural effusion in any image."""
    import dataclasses

    from llm_cxr.lm.addons.head import FindingHead

    head = FindingHead(torch.randn(N_CODES, 4), GRID, ["cardiomegaly", "pleural_effusion", "chest_tube"], width=4,
                       features=4, regions=(1, 1))
    with torch.no_grad():  # fixed logits: (present, left, right) x (cardiomegaly, effusion, chest tube)
        head.head.weight.zero_()
        head.head.bias.copy_(torch.tensor([[5.0, 5.0, -5.0], [0.0, 5.0, -5.0], [0.0, -5.0, 5.0]]).flatten())
    head.sided.copy_(torch.tensor([False, True, True]))
    model = LLMCXR(dataclasses.replace(gen.run, addons={**gen.run.addons, "finding_head": head}))
    assert model.finding_head is head and "finding_head" not in gen.run.addons
    return model


def test_guided_reports_state_the_finding_heads_reading_with_sides(gen, monkeypatch):
    """A run with a finding head (finding_head: conv) reads with it, not with the LM's checklist answer, and
    loads it from its folder; sides go into the prompt when the run was trained with them."""
    model = _with_fixed_head(gen)
    monkeypatch.setattr(model, "answer", lambda *a, **k: pytest.fail("the LM's checklist was asked"))
    monkeypatch.setattr(gen.run.info.guided, "reports", True)
    assert model.read_findings(CODES[:2]) == [["cardiomegaly", "pleural_effusion"]] * 2
    monkeypatch.setattr(gen.run.info.guided, "sides", True)
    assert model.read_findings(CODES[:1]) == [["cardiomegaly", "pleural_effusion:left"]]
    prompts = []
    real_text = model._text
    monkeypatch.setattr(model, "_text", lambda p, s, n: prompts.extend(p) or real_text(p, s, n))
    model.generate_report(CODES[:1], max_new_tokens=2)
    assert "Checklist findings: cardiomegaly and left pleural effusion" in gen.tok.decode(prompts[0])
    prompts.clear()
    model.generate_report(CODES[:1], max_new_tokens=2, findings=[["chest_tube:right"]])
    assert "Checklist findings: right chest tube" in gen.tok.decode(prompts[0])
    with pytest.raises(InputError, match="unknown sides"):
        model.generate_report(CODES[:1], findings=[["chest_tube:middle"]])


def test_guided_questions_state_the_reading(gen, monkeypatch):
    """A run trained with guided questions (stage.vqa_guided) answers with its reading in the prompt: the finding
    head's, or, without one, its own checklist answer -- asked unguided, once per image."""
    prompts = []
    monkeypatch.setattr(gen.run.info.guided, "vqa", True)
    monkeypatch.setattr(gen.run.info.guided, "sides", True)
    model = _with_fixed_head(gen)
    for m in (model, gen):
        real_text = m._text
        monkeypatch.setattr(m, "_text", lambda p, s, n, real_text=real_text: prompts.extend(p) or real_text(p, s, n))

    def said(m, **kw):
        prompts.clear()
        m.answer(CODES[:2], "Is there a pneumothorax?", max_new_tokens=2, **kw)
        return [gen.tok.decode(p) for p in prompts]

    texts = said(model)
    assert len(texts) == 2 and all("Checklist findings: cardiomegaly and left pleural effusion" in t for t in texts)
    assert all(GUIDE_PREFIX not in t for t in said(model, guided=False))
    assert all("Checklist findings: right chest tube" in t for t in said(model, findings=[["chest_tube:right"]] * 2))
    with pytest.raises(InputError, match="unknown finding names"):
        said(model, findings=[["effusion"]] * 2)
    # no head: the checklist question first (unguided), then the guided question, for both images
    texts = said(gen)
    assert len(texts) == 4 and all(CHECKLIST_QUESTIONS[0] in t and GUIDE_PREFIX not in t for t in texts[:2])
    assert all(GUIDE_PREFIX in t and "pneumothorax" in t for t in texts[2:])
    # a run trained with focused questions (stage.vqa_focus) also states the list's word on the finding asked
    assert all("Stated:" not in t for t in said(model))
    monkeypatch.setattr(gen.run.info.guided, "vqa_focus", True)
    assert all(t.rstrip().endswith("Stated: no pneumothorax\n### Response:") for t in said(model))
    prompts.clear()
    model.answer(CODES[:1], "Where is the pleural effusion, left or right?", max_new_tokens=2)
    assert "Stated: left pleural effusion" in gen.tok.decode(prompts[0])


def test_image_candidates_are_reranked_by_the_finding_head(gen, monkeypatch):
    from llm_cxr.lm.addons.head import FindingHead

    report = "Small left pleural effusion."
    with pytest.raises(ConfigError, match="no finding head"):
        gen.generate_image([report], candidates=2, findings=[[]])
    monkeypatch.setattr(gen, "finding_head", FindingHead(torch.randn(N_CODES, 4), GRID, ["pleural_effusion"],
                                                         width=4, features=4, regions=(1, 1)))
    with pytest.raises(InputError, match="one list per report"):
        gen.generate_image([report], candidates=2)
    seen = []

    def agreement(codes, wanted):  # prefer the candidate with the largest code sum
        seen.append(list(wanted))
        return codes.sum(1).float()

    monkeypatch.setattr(gen.finding_head, "agreement", agreement)
    s = Sampling(temperature=1.0, seed=0)
    drawn = gen.generate_image([report] * 3, s).codes  # the same batch of three draws, unranked
    best = gen.generate_image([report], s, candidates=3, findings=[["pleural_effusion:left"]])
    assert best.codes.shape == (1, GRID, GRID)  # one image per report (this fixture has no VQ-GAN to decode it)
    assert torch.equal(best.codes[0], drawn[drawn.flatten(1).sum(1).argmax()])
    assert seen == [[["pleural_effusion:left"]] * 3]


def test_guided_images_state_the_findings_the_report_asks_for(gen, monkeypatch):
    """A run trained with guided images (stage.image_guided) lists, after the report, what the report labeler reads
    in it (with sides when the run was trained with them), or the findings given; guided=False draws plainly."""
    prompts = []
    real = gen._decode
    monkeypatch.setattr(gen, "_decode", lambda p, *a, **k: prompts.extend(p) or real(p, *a, **k))

    def said(report, **kw):
        prompts.clear()
        gen.generate_image([report], Sampling(temperature=1.0, seed=0), **kw)
        return gen.tok.decode(prompts[0])

    report = "IMPRESSION: Small left pleural effusion. Endotracheal tube in place."
    assert GUIDE_PREFIX not in said(report)  # a plain run
    monkeypatch.setattr(gen.run.info.guided, "images", True)
    assert "Checklist findings: pleural effusion and endotracheal tube" in said(report)
    monkeypatch.setattr(gen.run.info.guided, "sides", True)
    assert "Checklist findings: left pleural effusion and endotracheal tube" in said(report)
    assert "Checklist findings: right chest tube" in said(report, findings=[["chest_tube:right"]])
    assert "Checklist findings: none" in said("IMPRESSION: No acute cardiopulmonary process.")
    assert GUIDE_PREFIX not in said(report, guided=False)
    # a report too long for the context is cut as in training: the list and the whole image still fit
    text = said("IMPRESSION: " + "The lungs are clear. " * 400 + "Small left pleural effusion.")
    assert "Checklist findings: left pleural effusion" in text
    assert len(prompts[0]) + gen.map.tokens_per_image + 2 <= gen.max_length
    with pytest.raises(InputError, match="1 reports and 2 finding lists"):
        gen.generate_image([report], findings=[[], []])


def test_cli_report_writes_the_findings_it_was_guided_by(gen, tmp_path, capsys, monkeypatch):
    import llm_cxr.cli.gen as cli_gen

    data = make_codes_dataset(tmp_path / "codes", n=8)
    run = str(gen.run.folder)
    out = tmp_path / "reports.jsonl"
    base = ["-q", "generate", "report", "--model", run, "--data", str(data), "--split", "train", "--limit", "2",
            "--max-new-tokens", "4"]
    assert main(base + ["--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(set(r) == {"id", "report"} for r in rows)  # a plain run: no checklist pass
    # a run not trained to write from a list refuses one, rather than writing what the list confuses it into
    assert main(base + ["--findings", "pleural_effusion, chest_tube", "--out", str(out)]) == 2
    assert "not trained to write reports from a findings list" in capsys.readouterr().err
    monkeypatch.setattr(cli_gen, "_load", lambda args: gen)
    monkeypatch.setattr(gen.run.info.guided, "reports", True)
    assert main(base + ["--findings", "pleural_effusion, chest_tube", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["findings"] for r in rows] == [["pleural_effusion", "chest_tube"]] * 2
    assert main(base + ["--findings", "effusion"]) != 0
    assert "unknown finding names ['effusion']" in capsys.readouterr().err
    assert main(base + ["--findings", "edema", "--plain"]) != 0
    assert "exclude each other" in capsys.readouterr().err


def test_cli_ask_answers_every_question_about_every_image_and_writes_the_findings_stated(gen, tmp_path, capsys,
                                                                                          monkeypatch):
    import llm_cxr.cli.gen as cli_gen

    monkeypatch.setattr(cli_gen, "_load", lambda args: gen)
    monkeypatch.setattr(gen, "codes_of", lambda images: images if isinstance(images, torch.Tensor)
                        else CODES[[int(str(i).endswith("b.png")) for i in images]])  # a.png -> row 0, b.png -> 1
    out = tmp_path / "answers.jsonl"
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"read by the patched codes_of")
    qs = ["Is there a pneumothorax?", "Which side is the effusion on?"]
    base = ["-q", "ask", "--model", "run", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-Q", qs[0], "-Q", qs[1]]
    assert main(base + ["--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["image"][-5:], r["question"]) for r in rows] == [("a.png", qs[0]), ("a.png", qs[1]), ("b.png", qs[0]),
                                                                ("b.png", qs[1])]
    assert all("findings" not in r for r in rows)  # a plain run
    assert [r["answer"] for r in rows] == gen.answer(CODES[[0, 0, 1, 1]], qs * 2)
    assert main(base + ["--findings", "pleural_effusion:right", "--out", str(out)]) == 2  # not trained for lists
    assert "not trained to write answers from a findings list" in capsys.readouterr().err
    monkeypatch.setattr(gen.run.info.guided, "vqa", True)
    assert main(base + ["--findings", "pleural_effusion:right", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["findings"] for r in rows] == [["pleural_effusion:right"]] * 4
    assert [r["answer"] for r in rows] == gen.answer(CODES[[0, 0, 1, 1]], qs * 2,
                                                     findings=[["pleural_effusion:right"]] * 4)
    assert main(base + ["--findings", "edema", "--plain"]) != 0
    assert "exclude each other" in capsys.readouterr().err
