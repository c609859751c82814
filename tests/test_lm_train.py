"""Language-model training: a 2-step CLI run is a loadable run, resumes exactly, continues as a next stage;
config errors; pretraining the embedded base."""

import csv
import json
import shutil

import pytest
import torch
from test_modeling import N_CODES, make_base, make_codes_dataset, write_codes_info

from llm_cxr.cli import main
from llm_cxr.errors import ConfigError
from llm_cxr.lm.addons import addon_file
from llm_cxr.lm.addons.head import HEAD_FILE, load_head
from llm_cxr.lm.addons.positions import find
from llm_cxr.lm.prompts import NAMES
from llm_cxr.lm.run import load_causal_lm, load_run
from llm_cxr.train.config import LMTrainConfig, load_lm_config
from llm_cxr.train.loop import CHECKPOINT, METRICS, swap_prompt_images
from llm_cxr.train.stage import train_lm

FAST = ["--batch-size", "2", "--mixed-precision", "no", "--set", "max_length=256", "--set", "lora.r=4",
        "--set", "loop.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_codes_dataset(tmp_path_factory.mktemp("data") / "codes", n=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    from llm_cxr.data.dataset import load_dataset

    return make_base(tmp_path_factory.mktemp("base") / "neox", "neox", texts=load_dataset(data)["report"])


def _train(data, base, out, steps, *extra):
    return main(["-q", "train", "--data", str(data), "--out", str(out), "--base", str(base), "--steps", str(steps),
                 *FAST, *extra])


def _metrics(run):
    with open(run / "metrics.csv") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _adapter_state(run):
    return torch.load(run / CHECKPOINT, weights_only=True)["trainable"]


@pytest.fixture(scope="module")
def two_step_run(data, base, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "s1"
    assert _train(data, base, run, 2) == 0
    return run


def test_two_step_cli_run_is_a_loadable_run(two_step_run, base):
    run = two_step_run
    info = json.loads((run / "model" / "run.json").read_text())
    assert info["kind"] == "lora" and info["base"] == str(base.resolve()) and info["max_length"] == 256
    tokens = json.loads((run / "model" / "image_tokens.json").read_text())
    assert tokens["n_codes"] == N_CODES and tokens["grid_size"] == 2 and tokens["vqgan_fingerprint"] == "fp"
    header, rows = _metrics(run)
    assert header == METRICS and [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 for r in rows)
    # the final evaluation also measures the loss with prompt images swapped between examples
    assert all(float(rows[-1][k]) > 0 for k in ("eval_loss", "eval_loss_read", "eval_loss_swapped"))
    trainable = json.loads((run / "trainable.json").read_text())
    assert 0 < trainable["trainable"] < trainable["total"] and 0 < trainable["share"] < 1
    assert json.loads((run / "DONE").read_text()) == {"steps": 2}
    assert json.loads((run / "config.json").read_text())["lora"]["r"] == 4
    loaded = load_run(run)
    assert loaded.token_map.n_codes == N_CODES and len(loaded.tokenizer) == loaded.token_map.vocab_size
    assert (run / "model" / addon_file("positions")).exists() and find(loaded.model) is not None
    # what was saved is what was trained: the checkpoint's adapter is the loaded one
    params = dict(loaded.model.named_parameters())
    state = _adapter_state(run)
    assert state and all(torch.equal(params[n], t) for n, t in state.items())


def test_rerun_with_more_steps_resumes_exactly(two_step_run, data, base, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(two_step_run, run)
    with open(run / "metrics.csv", "a") as f:  # logged after the last checkpoint, then killed
        f.write("3,0,99.0,,0.0001,0,1.0\n")
    assert _train(data, base, run, 4) == 0
    _, rows = _metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # continued, nothing repeated
    assert float(rows[2]["loss"]) != 99.0
    assert json.loads((run / "DONE").read_text()) == {"steps": 4}
    assert torch.load(run / CHECKPOINT, weights_only=True)["position"]["step"] == 4
    # 2 + 2 steps give the weights of 4 steps in one go (data position, optimizer and RNG restored)
    straight = tmp_path / "straight"
    assert _train(data, base, straight, 4) == 0
    a, b = _adapter_state(run), _adapter_state(straight)
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert not all(torch.equal(a[n], _adapter_state(two_step_run)[n]) for n in a)  # steps 3-4 did train


def test_another_stage_config_needs_a_new_folder(two_step_run, data, base, tmp_path, capsys):
    run = tmp_path / "s1"
    shutil.copytree(two_step_run, run)
    assert _train(data, base, run, 3, "--set", "stage.vqa=0") == 2
    assert "another config" in capsys.readouterr().err
    out = tmp_path / "novqa"
    assert _train(data, base, out, 1, "--set", "stage.vqa=0") == 0
    assert json.loads((out / "config.json").read_text())["stage"]["vqa"] == 0
    assert load_run(out).info.kind == "lora"


def test_next_stage_continues_the_adapter_and_checks_the_vqgan(two_step_run, data, tmp_path):
    other = tmp_path / "other-vqgan"
    shutil.copytree(data, other)
    write_codes_info(other, "another-fingerprint")
    cfg = load_lm_config(None, data=str(other), out=str(tmp_path / "s2"), init_from=str(two_step_run),
                         steps=1, batch_size=2, mixed_precision="no", max_length=256)
    with pytest.raises(ConfigError, match="do not match.*fingerprint"):
        train_lm(cfg)

    stage2 = {"stage": {"sections": "impression", "one_per_patient": True}, "loop": {"progress": False}}
    cfg = load_lm_config(None, stage2, data=str(data), out=str(tmp_path / "s2"), init_from=str(two_step_run), steps=1,
                         batch_size=2, mixed_precision="no", max_length=256)
    run = train_lm(cfg)
    s1 = _adapter_state(two_step_run)
    s2 = _adapter_state(run)
    assert s1.keys() == s2.keys()  # the same adapter, trained further
    assert any(not torch.equal(s1[n], s2[n]) for n in s1)
    info = load_run(run).info
    assert info.kind == "lora" and info.base == json.loads((two_step_run / "model" / "run.json").read_text())["base"]


def test_training_config_errors(tmp_path, data, base):
    with pytest.raises(ConfigError, match="exactly one of base"):
        LMTrainConfig(data="d", out="o")
    with pytest.raises(ConfigError, match="exactly one of base"):
        LMTrainConfig(data="d", out="o", base="b", init_from="r")
    with pytest.raises(ConfigError, match="needs 'data'"):
        load_lm_config(None, out="o", base="b")
    with pytest.raises(ConfigError, match="does not exist"):
        load_lm_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="lora"):
        load_lm_config(None, {"lora": {"rank": 4}}, data="d", out="o", base="b")
    # YAML 1.1 reads 1e-2 (no dot) as a string: number fields take it as the number; other mistakes are named
    cfg = load_lm_config(None, {"loop": {"lr": "1e-2", "steps": "1e3", "max_minutes": None}, "lora": {"r": 8.0}},
                         data="d", out="o", base="b")
    assert (cfg.loop.lr, cfg.loop.steps, cfg.loop.max_minutes, cfg.lora.r) == (0.01, 1000, None, 8)
    assert type(cfg.loop.steps) is int and type(cfg.lora.r) is int
    for bad, msg in (({"loop": {"steps": "abc"}}, "loop key 'steps' must be an int, got 'abc'"),
                     ({"loop": {"lr": True}}, "loop key 'lr' must be a float"),
                     ({"lora": {"r": 2.5}}, "lora key 'r' must be an int, got 2.5"),
                     ({"stage": {"one_per_patient": "maybe"}}, "stage key 'one_per_patient' must be a bool")):
        with pytest.raises(ConfigError, match=msg):
            load_lm_config(None, bad, data="d", out="o", base="b")
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text(f"data: {data}\nout: {tmp_path / 'r'}\nbase: {base}\nmax_length: 4096\n"
                        f"loop: {{steps: 1, mixed_precision: 'no', progress: false}}\n")
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        train_lm(load_lm_config(str(yaml_cfg)))


def test_pretrain_tiny_base_is_a_hugging_face_model(data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_cxr.train.base import BASE_PRESETS

    out = tmp_path / "pre"
    assert main(["-q", "lm", "pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "2", "--mixed-precision", "no"]) == 0
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tiny = BASE_PRESETS["tiny"]
    assert model.config.hidden_size == tiny.hidden and model.config.num_hidden_layers == tiny.layers
    assert model.get_input_embeddings().weight.shape[0] == len(tok) <= tiny.vocab
    assert tok.eos_token is not None and tok.pad_token is not None
    ids = tok("No pleural effusion.", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "No pleural effusion."
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((out / "DONE").read_text()) == {"steps": 2}
    _, rows = _metrics(out)
    assert int(rows[-1]["step"]) == 2
    # it is a base `llm-cxr train` can start from
    model, tok = load_causal_lm(str(out / "model"))
    assert tok.pad_token_id != tok.eos_token_id


def test_codebook_init_needs_the_vqgan_that_encoded_the_data(data, base, tmp_path):
    # the test dataset records no VQ-GAN path: a clear error before anything trains
    with pytest.raises(ConfigError, match="image_init: codebook needs the VQ-GAN"):
        train_lm(LMTrainConfig(data=str(data), out=str(tmp_path / "r"), base=str(base), image_init="codebook",
                               max_length=256, loop={"steps": 1, "batch_size": 2, "mixed_precision": "no"}))
    assert not (tmp_path / "r" / "model").exists()
    with pytest.raises(ConfigError, match="image_init must be"):
        LMTrainConfig(data=str(data), out=str(tmp_path / "r"), base=str(base), image_init="zeros")


def test_example_loss_weighs_every_example_the_same():
    """loop.loss: example -- each example's response tokens are averaged first, so a one-word answer weighs as much
    as a 258-token image; with equal response lengths it is the token mean."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from llm_cxr.lm.model import CXRModel, response_loss
    from llm_cxr.lm.sequence import collate
    from llm_cxr.train.config import LoopConfig

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).eval()
    rows = [{"input_ids": [3, 4, 5, 6, 7, 8, 9, 10], "n_prompt": 2}, {"input_ids": [11, 12, 13, 14], "n_prompt": 3}]
    cxr = CXRModel(model)

    def hf_loss(b):  # Hugging Face's own loss of the same batch
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss

    batch = collate(rows, pad_id=0, pad_to_multiple=1)
    alone = [hf_loss(collate([r], pad_id=0, pad_to_multiple=1)) for r in rows]  # 6 and 1 response tokens
    assert torch.allclose(response_loss(cxr, batch, "example"), (alone[0] + alone[1]) / 2, atol=1e-5)
    assert torch.allclose(response_loss(cxr, batch, "token"), (6 * alone[0] + alone[1]) / 7, atol=1e-5)
    assert torch.allclose(hf_loss(batch), (6 * alone[0] + alone[1]) / 7, atol=1e-5)  # the token mean
    same = collate([rows[0], {"input_ids": [15, 16, 17, 18, 19, 20, 21, 22], "n_prompt": 2}], pad_id=0)
    assert torch.allclose(response_loss(cxr, same, "example"), hf_loss(same), atol=1e-5)
    with pytest.raises(ConfigError, match="loop.loss"):
        LoopConfig(loss="sample")


def test_swapping_prompt_images_moves_whole_images_between_rows_only(tmp_path):
    from llm_cxr.lm.sequence import collate
    from llm_cxr.lm.tokens import ImageTokenMap

    m = ImageTokenMap(first_id=100, n_codes=16, begin_id=116, end_id=117, grid_size=2, vqgan_fingerprint="fp",
                      vocab_size=118)

    def row(codes, image_in_prompt=True):
        span = [m.begin_id, *[m.first_id + c for c in codes], m.end_id]
        return ({"input_ids": [5, *span, 6, 7, 1], "n_prompt": 7} if image_in_prompt else
                {"input_ids": [5, 6, *span, 1], "n_prompt": 3})

    rows = [row([0, 1, 2, 3]), row([4, 5, 6, 7]), row([8, 8, 8, 8], image_in_prompt=False), row([9, 9, 9, 9])]
    batch = collate(rows, pad_id=0, token_map=m, pad_to_multiple=1)
    same, out = swap_prompt_images(batch, m)
    keep = [0, 1, 3]  # row 2's image is the target: not a prompt image, left out
    assert all(torch.equal(getattr(same, k), getattr(batch, k)[keep]) for k in ("input_ids", "labels", "n_prompt"))
    ids = out.input_ids
    assert torch.equal(out.image.read, same.image.read)  # the swapped images are read as the originals were
    assert ids[0, 2:6].tolist() == [109] * 4 and ids[1, 2:6].tolist() == [100, 101, 102, 103]
    assert ids[2, 2:6].tolist() == [104, 105, 106, 107]
    assert torch.equal(out.labels, same.labels) and torch.equal(ids[:, 6:], same.input_ids[:, 6:])
    assert torch.equal(ids[:, :2], same.input_ids[:, :2])
    one = collate(rows[:1] + rows[2:3], pad_id=0, token_map=m)
    assert swap_prompt_images(one, m) is None  # one prompt image: no pairing


def test_metrics_of_an_older_run_get_the_new_header_and_lose_rows_after_the_checkpoint(tmp_path):
    from llm_cxr.train.loop import _tidy_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,loss,eval_loss,lr,tokens_per_s,seconds\n1,0,2.5,,0.001,900,1.0\n"
                    "2,0,2.4,2.6,0.001,910,2.0\n3,0,2.3,,0.001,905,3.0\n")
    _tidy_metrics(path, 2)
    header, rows = _metrics(tmp_path)
    assert header == METRICS and [r["step"] for r in rows] == ["1", "2"]
    assert rows[1]["eval_loss"] == "2.6" and rows[1]["eval_loss_swapped"] == "" and rows[1]["seconds"] == "2.0"


def test_image_reader_stage_pretrains_trains_and_reloads(data, base, tmp_path):
    """image_reader: conv end to end on the tiny dataset: the reader is pretrained on the labels, trained with
    the LM, saved with the run and restored by load_run; a dataset without labels is a clear error."""
    from test_modeling import GRID, N_CODES

    from llm_cxr.data.dataset import load_dataset
    from llm_cxr.vqgan.config import VQGANConfig
    from llm_cxr.vqgan.encode import codes_info
    from llm_cxr.vqgan.model import VQGAN

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                           resolution=2 * GRID, in_channels=1, out_ch=1, n_embed=N_CODES, embed_dim=4))
    assert vq.config.grid_size == GRID
    vq_dir = vq.save_pretrained(tmp_path / "vq")
    local = tmp_path / "codes"
    shutil.copytree(data, local)
    (local / "vqgan.json").write_text(json.dumps(codes_info(vq, vq_dir)))
    out = tmp_path / "r"
    assert _train(local, base, out, 2, "--set", "image_reader=conv", "--set", "reader_pretrain_epochs=1",
                  "--set", "image_init=codebook", "--set", "finding_head=conv", "--set", "finding_head_epochs=1") == 0
    loaded = load_run(out)
    # the finding head: trained on the findings before the LM, saved beside the model, inherited by the next stage
    head = load_head(out / "model")
    assert head is not None and torch.equal(head.codebook, vq.quantize.embedding.weight.detach().float())
    assert head.names and set(head.names) <= set(NAMES) and head.metrics["steps"] >= 1
    nxt = tmp_path / "next"
    assert main(["-q", "train", "--data", str(local), "--out", str(nxt), "--init-from", str(out), "--steps", "1",
                 *FAST]) == 0
    assert (nxt / "model" / HEAD_FILE).read_bytes() == (out / "model" / HEAD_FILE).read_bytes()
    reader = find(loaded.model).reader
    assert reader is not None and torch.equal(reader.codebook, vq.quantize.embedding.weight.detach().float())
    trained = torch.load(out / CHECKPOINT, weights_only=True)["trainable"]
    assert any("reader.trunk" in k for k in trained)  # trained with the LM, and resumable
    counted = json.loads((out / "trainable.json").read_text())["trainable"]
    assert counted == sum(t.numel() for t in trained.values())  # the reader is in the reported count

    ds = load_dataset(local).remove_columns(["labels"])
    nolabels = tmp_path / "nolabels"
    ds.save_to_disk(str(nolabels))
    shutil.copy(local / "vqgan.json", nolabels / "vqgan.json")
    from llm_cxr.errors import DatasetError

    with pytest.raises(DatasetError, match="labels") as err:  # the loader names the dataset and the column
        train_lm(LMTrainConfig(data=str(nolabels), out=str(tmp_path / "r2"), base=str(base), image_reader="conv",
                               max_length=256))
    assert "labels" in str(err.value) and str(nolabels) in str(err.value)


def test_guided_report_runs_are_marked_and_later_stages_inherit_it(two_step_run, data, base, tmp_path):
    def stage(out, report, guided, sides=False, vqa=2, vqa_guided=0, image=0, image_guided=0, vqa_from_findings=0,
              **src):
        cfg = load_lm_config(None, {"stage": {"report": report, "report_guided": guided, "image": image, "vqa": vqa,
                                              "vqa_guided": vqa_guided, "guide_sides": sides,
                                              "image_guided": image_guided,
                                              "vqa_from_findings": vqa_from_findings},
                                    "loop": {"progress": False}},
                             data=str(data), out=str(tmp_path / out), steps=1, batch_size=2, mixed_precision="no",
                             max_length=256, **src)
        g = load_run(train_lm(cfg)).info.guided
        return g.reports, g.vqa, g.sides, g.images

    assert load_run(two_step_run).info.guided.reports is False  # plain reports (the default)
    assert stage("g1", 0, 1, True, base=str(base), image_temperature=0.0,
                 image_guidance=1.25) == (True, False, True, False)
    assert stage("g2", 0, 0, init_from=str(tmp_path / "g1")) == (True, False, True, False)  # continues it
    assert stage("g3", 1, 0, init_from=str(tmp_path / "g1")) == (False, False, False, False)  # trained back to plain
    assert stage("g4", 0, 1, init_from=str(tmp_path / "g1"), image_temperature=0.7) == (True, False, False, False)
    # the drawing temperature: a stage's own, else its init_from's, else none recorded (the library's default)
    assert [load_run(tmp_path / g).info.image_temperature for g in ("g1", "g2", "g4")] == [0.0, 0.0, 0.7]
    assert load_run(two_step_run).info.image_temperature is None
    # the guidance scale likewise
    assert [load_run(tmp_path / g).info.image_guidance for g in ("g1", "g2", "g4")] == [1.25, 1.25, 1.25]
    assert load_run(two_step_run).info.image_guidance is None
    # guided questions: marked, inherited by a stage that asks none of its own, dropped by one that asks plain ones
    assert stage("v1", 1, 0, True, vqa=0, vqa_guided=1, base=str(base)) == (False, True, True, False)
    assert stage("v2", 1, 0, vqa=0, init_from=str(tmp_path / "v1")) == (False, True, True, False)
    assert stage("v3", 1, 0, vqa=1, init_from=str(tmp_path / "v1")) == (False, False, False, False)
    assert stage("t1", 1, 0, True, vqa=0, vqa_from_findings=1, base=str(base)) == (False, True, True, False)
    # guided images: marked, inherited by a stage that draws none of its own, dropped by one that draws plainly
    assert stage("i1", 1, 0, True, vqa=0, image_guided=1, base=str(base)) == (False, False, True, True)
    assert stage("i2", 1, 0, vqa=0, init_from=str(tmp_path / "i1")) == (False, False, True, True)
    assert stage("i3", 1, 0, vqa=0, image=1, init_from=str(tmp_path / "i1")) == (False, False, False, False)


def test_image_plan_trains_from_zero_saves_and_is_inherited(data, base, tmp_path):
    """image_plan: the maps start at zero, are trained by guided drawings (their plans reach the model through
    the batches), are saved with the run and in the checkpoint, and a next stage keeps them."""
    out = tmp_path / "r"
    drawing = ["--set", "stage.report=0", "--set", "stage.vqa=0", "--set", "stage.checklist=0",
               "--set", "stage.image=0", "--set", "stage.image_guided=1", "--set", "stage.guide_sides=true"]
    assert _train(data, base, out, 3, "--set", "image_plan=true", *drawing) == 0
    plan = find(load_run(out).model).plan
    assert plan is not None and float(plan.maps.abs().sum()) > 0  # moved from zero: the plans were used
    assert any(k.endswith("plan.maps") for k in _adapter_state(out))  # resumable
    assert json.loads((out / "model" / "run.json").read_text())["guided"]["images"] is True
    nxt = tmp_path / "next"
    assert main(["-q", "train", "--data", str(data), "--out", str(nxt), "--init-from", str(out), "--steps", "1",
                 *FAST, *drawing]) == 0
    kept = find(load_run(nxt).model).plan
    assert kept is not None and kept.items == plan.items
    with pytest.raises(ConfigError, match="image_plan needs image_positions: 2d"):
        LMTrainConfig(data="d", out="o", base="b", image_plan=True, image_positions="none")


def test_bf16_runs_as_fp32_where_the_cpu_emulates_it(monkeypatch, caplog):
    """mixed_precision: bf16 on a CPU without AVX-512/AMX kernels (where bf16 autocast is many times slower than
    fp32) trains in fp32, with a warning; on a CPU that has them it stays bf16."""
    from llm_cxr import accel

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    accel._warn_slow_bf16.cache_clear()
    with caplog.at_level("WARNING"):
        assert accel.effective_precision("bf16", "cpu") == "no"
    assert "slower than fp32" in caplog.text
    assert accel.effective_precision("no", "cpu") == "no"
    assert accel.make_accelerator("bf16").mixed_precision == "no"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert accel.effective_precision("bf16", "cpu") == "bf16" and accel.bf16_is_fast("cpu")
    assert accel.make_accelerator("bf16").mixed_precision == "bf16"
