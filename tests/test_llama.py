"""--arch llama (rotary positions, RMSNorm, SwiGLU, no biases, tied embeddings) and the vocabulary
padded to a multiple of 64, on real runs: training, final_model/ in transformers, the exports,
exact resume, and a checkpoint written before the padding."""
import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

import trainer.model
from trainer import export as export_cli
from trainer import generate as generate_cli
from trainer.checkpoints import MODEL_FILE, export_json, import_json, load_checkpoint
from trainer.config import TrainConfig
from trainer.errors import ConfigError, TrainingInterrupted
from trainer.export import export_hf
from trainer.export.inference import load_model_dir
from trainer.memory import FaultInjector
from trainer.model import build_model, count_parameters, next_token_loss, padded_vocab, swiglu_width
from trainer.muon import hidden_matrices
from trainer.recorder import EVENT_RESUME_CHECKPOINT
from trainer.run import train
from trainer_fixtures import STEPS_PER_EPOCH, ListRecorder, SignalAt, run_with_faults

QUIET = dict(log=lambda *_: None)
TOKENS = 300        # the tests' BPE: not a multiple of 64, so the model pads it to 320


@pytest.fixture(scope="module")
def cfg300(tiny_base_cfg):
    return tiny_base_cfg.replace(vocab_size=TOKENS)


@pytest.fixture(scope="module")
def data300(cfg300):
    """A 300-token BPE's streams, cut to 30 optimizer steps an epoch (as tiny_data)."""
    from trainer.data import prepare_data

    data = prepare_data(cfg300, **QUIET)
    assert data.vocab_size == TOKENS
    keep = STEPS_PER_EPOCH * cfg300.effective_batch * cfg300.block_size + 1
    return dataclasses.replace(data, train=data.train[:keep])


@pytest.fixture(scope="module")
def llama_cfg(cfg300):
    return cfg300.replace(arch="llama")


@pytest.fixture(scope="module")
def llama_run(llama_cfg, data300, tmp_path_factory):
    """A finished one-epoch llama run: (its result, its per-step losses)."""
    rec = ListRecorder()
    result = train(llama_cfg.replace(out_dir=str(tmp_path_factory.mktemp("llama") / "run"), epochs=1), rec,
                   data=data300, **QUIET)
    return result, rec.losses()


# -- the model --------------------------------------------------------------------------------
def test_the_vocabulary_is_padded_to_a_multiple_of_64():
    assert [padded_vocab(n) for n in (1, 64, 65, 300, 512, 50257)] == [64, 64, 128, 320, 512, 50304]
    for arch in ("gpt2", "llama"):
        model = build_model(TrainConfig(arch=arch, n_layer=1, n_embd=32, n_head=2, block_size=32), TOKENS, 0)
        assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 320
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert model.generation_config.suppress_tokens == list(range(TOKENS, 320))
    assert build_model(TrainConfig(n_layer=1, n_embd=32, n_head=2), 512, 0).generation_config.suppress_tokens is None


def test_llama_is_the_llama_family_with_gpt2s_parameter_count():
    cfg = TrainConfig(arch="llama", dropout=0.1)
    model = build_model(cfg, TOKENS, 5)
    c = model.config
    assert isinstance(model, LlamaForCausalLM) and c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.max_position_embeddings) == (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head, cfg.block_size)
    assert c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias and c.hidden_act == "silu"
    assert c.rope_parameters["rope_type"] == "default" and c.attention_dropout == 0.1
    assert (c.bos_token_id, c.eos_token_id) == (5, 5)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert c.intermediate_size % 64 == 0
    for n_layer, n_embd, n_head, block_size in [(4, 128, 4, 128), (1, 32, 2, 32), (6, 384, 6, 256)]:
        sizes = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)
        # the default BPE's 4096 tokens: at 128 wide, a step of 64 in the MLP is 6% of the blocks
        gpt2 = count_parameters(build_model(TrainConfig(**sizes), 4096, 0))
        llama = count_parameters(build_model(TrainConfig(arch="llama", **sizes), 4096, 0))
        assert abs(llama / gpt2 - 1) < 0.05, sizes
        # and no other multiple of 64 comes closer
        h = swiglu_width(n_layer, n_embd, block_size)
        for other in (h - 64, h + 64):
            assert abs(llama - gpt2) <= abs(llama + 3 * n_layer * n_embd * (other - h) - gpt2) or other < 64


def test_llama_groups_its_parameters_for_muon_and_weight_decay(llama_cfg):
    model = build_model(llama_cfg.replace(optimizer="muon"), TOKENS, 0)
    muon = {m.name for m in hidden_matrices(model)}
    assert muon == {f"model.layers.0.{layer}.weight" for layer in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    optimizer = trainer.model.build_optimizer(model, llama_cfg.replace(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    adamw = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
             for g in optimizer.param_groups if g["algorithm"] == "adamw"]
    assert adamw == [(llama_cfg.weight_decay, ["model.embed_tokens.weight"]),       # lm_head is the same tensor
                     (0.0, ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                            "model.norm.weight"])]


def test_the_chunked_loss_is_the_full_loss_for_llama(llama_cfg):
    model = build_model(llama_cfg, TOKENS, 0)
    batch = torch.randint(0, TOKENS, (4, 33), generator=torch.Generator().manual_seed(0))
    full = next_token_loss(model, batch, chunk_tokens=0)
    assert next_token_loss(model, batch, chunk_tokens=48).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.slow     # torch.compile's first call: about 40 s on a 2-core CPU
def test_compile_gives_llamas_eager_loss_and_gradients(llama_cfg):
    from trainer.model import LanguageModelLoss, compiled

    model = build_model(llama_cfg, TOKENS, 0)
    batch = torch.randint(0, TOKENS, (4, 33), generator=torch.Generator().manual_seed(0))
    eager = LanguageModelLoss(model)(batch)
    eager.backward()
    expected = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    loss = compiled(LanguageModelLoss(model), True)(batch)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_an_injected_oom_lands_in_llamas_last_layer(llama_cfg):
    model = build_model(llama_cfg.replace(n_layer=2), TOKENS, 0)
    batch = torch.randint(0, TOKENS, (2, 9))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="step 3"):
        with FaultInjector(oom_steps={3}).oom_inside(model, 3):
            next_token_loss(model, batch)
    assert not model.model.layers[-1]._forward_hooks
    next_token_loss(model, batch)       # once only


# -- real runs --------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_tiny_llama_trains(llama_cfg, data300, tmp_path, optimizer):
    rec = ListRecorder()
    result = train(llama_cfg.replace(out_dir=str(tmp_path / "run"), epochs=1, optimizer=optimizer), rec,
                   data=data300, **QUIET)
    losses = [rec.losses()[s] for s in sorted(rec.losses())]
    assert result.status == "completed" and len(losses) == STEPS_PER_EPOCH
    assert losses[0] == pytest.approx(np.log(320), abs=0.3)        # the padded vocabulary at initialisation
    assert np.mean(losses[-3:]) < losses[0] - 1.0
    saved = load_file(str(Path(result.final_checkpoint) / MODEL_FILE))
    assert saved["model.embed_tokens.weight"].shape == (320, llama_cfg.n_embd) and "lm_head.weight" not in saved


def test_an_oom_at_micro_batch_one_completes_with_checkpointing_on_for_llama(llama_cfg, data300, tmp_path,
                                                                                 monkeypatch):
    cfg = llama_cfg.replace(micro_batch=2, grad_accum=4, epochs=1, max_steps=6)
    plain, plain_db = run_with_faults(cfg, data300, tmp_path, "plain", monkeypatch)
    hit, db = run_with_faults(cfg, data300, tmp_path, "hit", monkeypatch, oom="2,4")
    ooms = db.events(hit.run_id).query("kind == 'oom'")
    assert hit.status == "completed" and [d["remedy"] for d in ooms.detail] == ["halve_micro_batch",
                                                                                 "gradient_checkpointing"]
    losses = db.steps(hit.run_id).set_index("step").loss.to_numpy()
    assert losses == pytest.approx(plain_db.steps(plain.run_id).set_index("step").loss.to_numpy(), rel=1e-4)


# -- final_model/ and the exports ---------------------------------------------------------------
def test_final_model_loads_in_transformers_with_the_trained_logits(llama_run, llama_cfg, data300):
    result, _ = llama_run
    final = Path(result.final_model)
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and len(tokenizer) == TOKENS
    assert json.loads((final / "generation_config.json").read_text())["suppress_tokens"] == list(range(TOKENS, 320))
    trained = build_model(llama_cfg, TOKENS, data300.tokenizer.eos_token_id)
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    load_checkpoint(Path(result.final_checkpoint), model=trained, optimizer=None, scaler=no_scaler)
    ids = tokenizer("def main(", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained.eval()(ids).logits)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]


def test_a_llama_checkpoint_round_trips_through_json(llama_run, tmp_path):
    checkpoint = Path(llama_run[0].final_checkpoint)
    assert export_cli.main(["json", str(checkpoint), "--out", str(tmp_path / "c.json")]) == 0
    assert export_cli.main(["import", str(tmp_path / "c.json"), "--out", str(tmp_path / "back")]) == 0
    for f in checkpoint.iterdir():
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.fixture(scope="module")
def padded_ids_dominate(llama_run, tmp_path_factory):
    """llama_run's final_model/ with the padded rows made huge: unsuppressed, they would win every draw."""
    final = Path(llama_run[0].final_model)
    model, tokenizer = load_model_dir(final)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight
        rows[TOKENS:] = 100 * torch.randn(rows[TOKENS:].shape, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig.from_dict(json.loads((final / "training_config.json").read_text())["config"])
    return export_hf(model, tokenizer, cfg, tmp_path_factory.mktemp("dominant") / "final_model")


def test_padded_ids_are_never_generated(padded_ids_dominate):
    model = AutoModelForCausalLM.from_pretrained(padded_ids_dominate, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(padded_ids_dominate, local_files_only=True)
    ids = tokenizer("import os\n", return_tensors="pt").input_ids
    sample = dict(max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    unsuppressed = model.generate(ids, suppress_tokens=[], **sample)[0, ids.shape[1]:]
    assert (unsuppressed >= TOKENS).all()               # the test can fail: they would win
    torch.manual_seed(0)
    assert (model.generate(ids, **sample)[0, ids.shape[1]:] < TOKENS).all()   # generation_config.json's list
    # trainer.generate suppresses them itself (an int8 directory has no such list): text comes out
    texts = generate_cli.generate(str(padded_ids_dominate), "import os\n", max_new_tokens=12, num_samples=3)
    assert all(len(t) > len("import os\n") for t in texts)


def test_llama_exports_to_onnx_with_the_tokenizers_logits(llama_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")
    from trainer.export.onnx_export import onnx_logits, onnx_session

    final = llama_run[0].final_model
    out = tmp_path / "model.onnx"
    assert export_cli.main(["onnx", final, "--out", str(out)]) == 0
    model, _ = load_model_dir(final)
    session = onnx_session(out)
    for shape in [(1, 1), (3, 7), (2, 32)]:          # dynamic batch and sequence, up to the context
        ids = torch.randint(0, TOKENS, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = model(input_ids=ids).logits[..., :TOKENS].numpy()
        got = onnx_logits(session, ids)
        assert got.shape == expected.shape            # the padded ids' columns are cut
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_llama_exports_to_int8_and_generates_from_it(llama_run, data300, tmp_path):
    from trainer.export.int8 import quantize

    final, out = llama_run[0].final_model, tmp_path / "int8"
    assert export_cli.main(["int8", final, "--out", str(out)]) == 0
    loaded, _ = load_model_dir(out)
    linear = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, linear) for m in loaded.modules()) == 7 + 1   # q, k, v, o, gate, up, down + lm_head
    fp32, _ = load_model_dir(final)
    ids = torch.randint(0, TOKENS, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, again, exact = (m(input_ids=ids).logits for m in (loaded, quantize(fp32), fp32))
    assert torch.equal(got, again)                                  # rebuilt from the saved integers
    assert 0 < (got - exact).abs().max() < 0.1 * exact.abs().max()  # rounded, but close
    assert generate_cli.generate(str(out), "def ", max_new_tokens=5, temperature=0)[0].startswith("def ")
    # rotary positions, but trained on 32 only: generation stops at the context as GPT-2's does
    (text,) = generate_cli.generate(final, "def " * 50, max_new_tokens=100, temperature=0)
    assert len(data300.tokenizer(text).input_ids) <= 32


# -- resume -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_llama_cfg(llama_cfg):
    # Accumulation and (attention) dropout: RNG used on every step; Muon's state in the checkpoints.
    return llama_cfg.replace(micro_batch=4, grad_accum=2, dropout=0.1, save_every=10, keep_checkpoints=10,
                             optimizer="muon")


def reference_run(cfg, data, out: Path):
    rec = ListRecorder()
    train(cfg.replace(out_dir=str(out)), rec, data=data, **QUIET)
    return rec.losses(), load_file(str(out / "final_model" / MODEL_FILE))


def interrupted_run(cfg, data, at: int):
    rec = SignalAt(at, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, rec, data=data, **QUIET)
    return rec, stop.value


def assert_same_run(first, second, out_dir, reference):
    assert {**first.losses(), **second.losses()} == reference[0]        # every step's loss, exactly
    got = load_file(str(Path(out_dir) / "final_model" / MODEL_FILE))
    assert got.keys() == reference[1].keys() and all(torch.equal(got[k], reference[1][k]) for k in got)


def test_an_interrupted_llama_run_resumes_bit_identically(exact_llama_cfg, data300, tmp_path):
    reference = reference_run(exact_llama_cfg, data300, tmp_path / "reference")
    cfg = exact_llama_cfg.replace(out_dir=str(tmp_path / "run"))
    first, _ = interrupted_run(cfg, data300, at=13)
    with pytest.raises(ConfigError, match="--arch 'llama' there, 'gpt2' here"):
        train(cfg.replace(resume="auto", arch="gpt2"), data=data300, **QUIET)
    second = ListRecorder()
    assert train(cfg.replace(resume="auto"), second, data=data300, **QUIET).status == "completed"
    assert min(second.losses()) == 14
    assert_same_run(first, second, tmp_path / "run", reference)


def test_a_checkpoint_written_before_the_padding_resumes_exactly(cfg300, data300, tmp_path, monkeypatch):
    """Shaped as the earlier code wrote it: the tokenizer's 300 rows, no `arch` in its config."""
    old = cfg300.replace(micro_batch=4, grad_accum=2, dropout=0.1, save_every=10)
    monkeypatch.setattr(trainer.model, "padded_vocab", lambda n: n)      # the code before the padding
    reference = reference_run(old, data300, tmp_path / "reference")
    first, stop = interrupted_run(old.replace(out_dir=str(tmp_path / "old")), data300, at=13)
    monkeypatch.undo()
    assert reference[1]["transformer.wte.weight"].shape[0] == TOKENS

    as_json = tmp_path / "old.json"
    export_json(Path(stop.checkpoint_path), as_json)
    doc = json.loads(as_json.read_text())
    del doc["files"]["trainer_state.json"]["json"]["config"]["arch"]
    as_json.write_text(json.dumps(doc))
    import_json(as_json, tmp_path / "uploaded" / "step-0000013")

    second = ListRecorder()
    cfg = old.replace(out_dir=str(tmp_path / "run"), resume="auto", resume_from=[str(tmp_path / "uploaded")])
    assert train(cfg, second, data=data300, **QUIET).status == "completed"
    [resumed] = [d for kind, _, d in second.events if kind == EVENT_RESUME_CHECKPOINT]
    assert resumed["path"].endswith("step-0000013") and resumed["config_changes"] == []
    assert_same_run(first, second, tmp_path / "run", reference)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model", local_files_only=True)
    assert isinstance(model, GPT2LMHeadModel) and model.config.vocab_size == TOKENS
