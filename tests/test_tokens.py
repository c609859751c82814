"""Image tokens in any causal LM's vocabulary: ids, identity on the reserved range, mean init, checks."""

import pytest
import torch

from llm_cxr.errors import ConfigError, InputError
from llm_cxr.lm.tokens import BEGIN_IMAGE, END_IMAGE, ImageTokenMap, add_image_tokens, image_token


@pytest.fixture(scope="module")
def tokenizer_factory():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def make(vocab_size=120):
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        text = ["No pleural effusion or pneumothorax.", "Small left pleural effusion.", "Heart size is normal."] * 20
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size,
                                                          special_tokens=["[UNK]", "<|endoftext|>"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]")

    return make


def _neox(vocab, tie=False):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=tie)
    return GPTNeoXForCausalLM(cfg)


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))


@pytest.mark.parametrize("make_model", [_neox, _llama])
def test_add_image_tokens_extends_any_vocab_and_starts_rows_at_the_mean(tokenizer_factory, make_model):
    for vocab_size in (90, 120):  # nothing depends on the text vocabulary's size
        tok = tokenizer_factory(vocab_size)
        model = make_model(len(tok))
        old_in = model.get_input_embeddings().weight.detach().clone()
        old_out = model.get_output_embeddings().weight.detach().clone()
        m = add_image_tokens(tok, model, n_codes=64, grid_size=8, vqgan_fingerprint="abc")
        assert m.first_id == len(tok) - 66 and m.vocab_size == len(tok)
        assert (tok.convert_tokens_to_ids([image_token(5), BEGIN_IMAGE, END_IMAGE])
                == [m.first_id + 5, m.begin_id, m.end_id])
        emb = model.get_input_embeddings().weight
        assert emb.shape[0] == len(tok)
        assert torch.allclose(emb[m.first_id:], old_in.mean(0).expand(66, -1), atol=1e-6)
        assert torch.allclose(model.get_output_embeddings().weight[m.first_id:], old_out.mean(0).expand(66, -1),
                              atol=1e-6)
        # the reserved range is an identity: code -> id -> code
        codes = torch.arange(64).view(8, 8)
        assert torch.equal(m.ids_to_codes(m.codes_to_ids(codes)), codes)
        assert (m.is_image_id(torch.tensor([m.first_id - 1, m.first_id, m.first_id + 63, m.begin_id])).tolist()
                == [False, True, True, False])
        # the tokenizer keeps an image token whole and round-trips it
        text = f"{BEGIN_IMAGE}{image_token(3)}{image_token(63)}{END_IMAGE}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == [m.begin_id, m.first_id + 3, m.first_id + 63, m.end_id]
        # idempotent: a second call changes nothing
        assert add_image_tokens(tok, model, 64, 8, "abc") == m
        assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_map_errors_and_saved_map_check(tokenizer_factory, tmp_path):
    tok = tokenizer_factory()
    m = add_image_tokens(tok, None, n_codes=16, grid_size=4, vqgan_fingerprint="fp1")
    with pytest.raises(InputError, match=r"\[0, 15\]"):
        m.codes_to_ids(torch.tensor([16]))
    with pytest.raises(InputError, match="not image tokens"):
        m.ids_to_codes(torch.tensor([m.begin_id]))
    m.save(tmp_path)
    loaded = ImageTokenMap.load(tmp_path)
    assert loaded == m
    loaded.check_vqgan(16, 4, "fp1")
    with pytest.raises(ConfigError, match="codebook size: the model was trained with 16, the VQ-GAN has 32"):
        loaded.check_vqgan(32, 4, "fp1")
    with pytest.raises(ConfigError, match="fingerprint"):
        loaded.check_vqgan(16, 4, "other")
    with pytest.raises(ConfigError, match="another codebook size"):
        add_image_tokens(tok, None, n_codes=32, grid_size=4, vqgan_fingerprint="fp1")
    with pytest.raises(ConfigError, match="no image_tokens.json"):
        ImageTokenMap.load(tmp_path / "nothing")


@pytest.mark.parametrize("tie", [False, True])
def test_codebook_init_keeps_codebook_geometry_and_leaves_text_rows(tokenizer_factory, tie):
    from llm_cxr.lm.tokens import init_image_rows_from_codebook

    tok = tokenizer_factory(100)
    model = _neox(len(tok), tie=tie)
    m = add_image_tokens(tok, model, n_codes=64, grid_size=8, vqgan_fingerprint="abc")
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    codebook = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    init_image_rows_from_codebook(model, m, codebook)
    emb = model.get_input_embeddings().weight.detach()
    rows = emb[m.first_id:m.first_id + 64]
    assert torch.equal(emb[:m.first_id], emb_before[:m.first_id])  # text rows untouched
    assert torch.equal(emb[m.begin_id:], emb_before[m.begin_id:])  # boundary tokens keep the mean
    # the projection is orthonormal: distances between rows are the codebook's, up to one scale
    d_rows, d_code = torch.pdist(rows.float()), torch.pdist(codebook)
    ratio = d_rows / d_code
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    # centred at the text mean, spread like the text rows
    assert torch.allclose(rows.mean(0), emb_before[:m.first_id].mean(0), atol=1e-5)
    assert rows.std(0).mean() == pytest.approx(emb_before[:m.first_id].std(0).mean().item(), rel=0.3)
    head = model.get_output_embeddings().weight.detach()
    if tie:
        assert torch.equal(head[m.first_id:m.first_id + 64], rows)
    else:
        assert not torch.allclose(head[m.first_id:m.first_id + 64], out_before[m.first_id:m.first_id + 64])
        assert torch.equal(head[:m.first_id], out_before[:m.first_id])
    with pytest.raises(ConfigError, match="does not match the 64 image tokens"):
        init_image_rows_from_codebook(model, m, torch.randn(32, 8))


def test_pick_attention():
    from llm_cxr.train.lora import pick_attention

    assert pick_attention("auto", "cpu", "bf16") == "eager"
    assert pick_attention("auto", "cpu", "no") == "sdpa"
    assert pick_attention("auto", "cuda", "bf16") == "sdpa"
    assert pick_attention("flash_attention_2", "cpu", "bf16") == "flash_attention_2"


def test_cached_text_ids_equal_the_tokenizer_and_follow_added_tokens(tokenizer_factory):
    from llm_cxr.lm.sequence import _text_ids

    tok = tokenizer_factory(120)
    text = f"Small left pleural effusion.{BEGIN_IMAGE}"
    first = _text_ids(tok, text)
    assert first == tok(text, add_special_tokens=False)["input_ids"] == _text_ids(tok, text)
    first.append(-1)  # callers get a copy: the cached ids cannot be changed through it
    assert _text_ids(tok, text) == tok(text, add_special_tokens=False)["input_ids"]
    tok.add_tokens([BEGIN_IMAGE])  # a new token splits the same text differently: the cache must not answer
    after = _text_ids(tok, text)
    assert after == tok(text, add_special_tokens=False)["input_ids"] and after != first[:-1]
    assert after[-1] == tok.convert_tokens_to_ids(BEGIN_IMAGE)
