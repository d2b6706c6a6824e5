"""--optimizer muon: the split of the parameters, the Newton-Schulz iteration against torch's, and
real runs (training, exact resume, accumulation, the gradient scaler, checkpoints, the LR finder)."""
import json
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz
from transformers.pytorch_utils import Conv1D

from trainer.checkpoints import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.device import Gpu, newton_schulz_dtype
from trainer.errors import CheckpointError, ConfigError, TrainingInterrupted
from trainer.model import build_model, build_optimizer, next_token_loss
from trainer.muon import ADAMW, MUON, NS_COEFFICIENTS, NS_EPS, NS_STEPS, MuonWithAdamW, hidden_matrices, orthogonalise
from trainer.run import train
from trainer.schedule import lr_at
from trainer.state import TrainState
from trainer_fixtures import ListRecorder, SignalAt

QUIET = {"log": lambda *_: None}
SMALL = TrainConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, optimizer="muon")
SHAPES = [(32, 96), (96, 32), (48, 48), (128, 512)]     # wide, tall, square, GPT-2's c_fc at n_embd 128


def names_in(model, optimizer, algorithm):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g.get("algorithm") == algorithm for p in g["params"]}


def torch_newton_schulz(g):
    return _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, NS_STEPS, NS_EPS)


def relative_error(x, reference):
    return ((x.double() - reference).norm() / reference.norm()).item()


# -- which parameters Muon trains ------------------------------------------------------------
def test_muon_takes_exactly_the_blocks_2d_matrices_and_adamw_the_rest():
    model = build_model(SMALL, 300, 0)
    optimizer = build_optimizer(model, SMALL)
    blocks = {f"transformer.h.{i}.{layer}.weight" for i in range(2)
              for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names_in(model, optimizer, MUON) == blocks == {m.name for m in hidden_matrices(model)}
    everything = {n for n, _ in model.named_parameters()}       # the tied lm_head is wte: named once
    assert names_in(model, optimizer, ADAMW) == everything - blocks
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= names_in(model, optimizer, ADAMW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(everything)
    adamw_groups = [g for g in optimizer.param_groups if g["algorithm"] == ADAMW]
    assert optimizer.param_groups[0] is adamw_groups[0]        # param_groups[0]["lr"] is --lr, as reported
    assert [g["weight_decay"] for g in adamw_groups] == [SMALL.weight_decay, 0.0]    # no decay on 1-D
    assert all(p.dim() < 2 for p in adamw_groups[1]["params"])
    (muon,) = [g for g in optimizer.param_groups if g["algorithm"] == MUON]
    assert (muon["base_lr"], muon["momentum"], muon["weight_decay"], muon["in_out"]) == (0.02, 0.95, 0.0, True)
    assert all(isinstance(m, Conv1D) for n, m in model.named_modules() if f"{n}.weight" in blocks)


def test_adamw_stays_torchs_fused_adamw_by_default():
    model = build_model(SMALL.replace(optimizer="adamw"), 300, 0)
    optimizer = build_optimizer(model, SMALL.replace(optimizer="adamw"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert [g["base_lr"] for g in optimizer.param_groups] == [SMALL.lr, SMALL.lr]


# -- the Newton-Schulz iteration ---------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_the_bf16_iteration_is_torchs_bit_for_bit(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(orthogonalise(g, torch.bfloat16), torch_newton_schulz(g))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_fp32_and_fp16_iterations_are_close_to_the_exact_one_and_orthogonalise(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    exact = orthogonalise(g.double(), torch.float64)        # the same five steps in float64
    # A few unit roundoffs of each dtype, grown over five steps of 3 products each: fp32's is 6e-8,
    # fp16's 4.9e-4, bf16's 3.9e-3 (measured: 1.4e-6, 2.3e-3 and 1.9e-2 at most over these shapes).
    assert relative_error(orthogonalise(g, torch.float32), exact) < 1e-5
    assert relative_error(orthogonalise(g, torch.float16), exact) < 1e-2
    assert relative_error(torch_newton_schulz(g), exact) < 5e-2
    # so fp32 and fp16 differ from torch's bf16 by bf16's own error, no more
    assert relative_error(orthogonalise(g, torch.float32), torch_newton_schulz(g).double()) < 5e-2


@pytest.mark.parametrize("shape", SHAPES)
def test_the_iteration_maps_each_singular_value_into_the_known_band(shape):
    # Newton-Schulz acts on each singular value alone: s -> a s + b s^3 + c s^5, five times, after the
    # division by the Frobenius norm. Built with singular values from 0.1 to 1 (a random square
    # matrix's smallest are near 0, which five steps do not lift), the output's are that scalar map's.
    gen = torch.Generator().manual_seed(3)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, k, dtype=torch.float64)
    g = (u * s) @ v.T
    expected = s / s.norm()
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        expected = a * expected + b * expected ** 3 + c * expected ** 5
    # Keller Jordan's coefficients trade exactness for speed: the values oscillate in about
    # [0.68, 1.14] rather than converge to 1.
    assert 0.65 < expected.min() and expected.max() < 1.2
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 1e-2)):   # measured 1.2e-6, 2.2e-3
        out = orthogonalise(g.float(), dtype)
        assert out.shape == g.shape and out.dtype == dtype
        singular = torch.linalg.svdvals(out.double())
        assert torch.allclose(singular.sort().values, expected.sort().values, atol=tolerance), dtype


def test_fp16_divides_by_the_norm_in_fp32_so_large_gradients_do_not_overflow():
    g = 1e4 * torch.randn(64, 192, generator=torch.Generator().manual_seed(3))     # norm ~1e6 > 65504
    assert not torch.isfinite(g.half().norm())          # what a normalisation in fp16 would divide by
    out = orthogonalise(g, torch.float16)
    assert torch.isfinite(out).all()
    assert relative_error(out, orthogonalise(g.double(), torch.float64)) < 1e-2


def test_the_iteration_dtype_is_the_devices_native_one(monkeypatch):
    import trainer.device

    gpu = lambda major, minor: Gpu(0, "gpu", (major, minor), 16 * 1024 ** 3)
    cuda = torch.device("cuda", 0)
    assert newton_schulz_dtype(cuda, gpu(8, 0)) == torch.bfloat16       # A100 and newer: as torch.optim.Muon
    assert newton_schulz_dtype(cuda, gpu(7, 5)) == torch.float16        # T4: fp16 tensor cores
    assert newton_schulz_dtype(cuda, gpu(6, 0)) == torch.float32        # P100
    monkeypatch.setattr(trainer.device, "cpu_has_native_bf16", lambda: True)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(trainer.device, "cpu_has_native_bf16", lambda: False)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert build_optimizer(build_model(SMALL, 300, 0), SMALL).ns_dtype == torch.float32


# -- one optimizer step, against torch's optimizers ------------------------------------------------
def test_a_conv1d_weight_moves_exactly_as_torch_muon_moves_the_same_linear_weight():
    # Conv1D stores (in, out); the nn.Linear of the same layer stores its transpose. Both shapes of
    # the lr adjustment occur: (out, in) = (96, 32) takes sqrt(3) x lr, (32, 96) takes lr.
    gen = torch.Generator().manual_seed(4)
    for n_in, n_out in ((32, 96), (96, 32)):
        conv = torch.nn.Parameter(torch.randn(n_in, n_out, generator=gen))
        linear = torch.nn.Parameter(conv.detach().T.contiguous())
        mine = MuonWithAdamW([{"params": [conv], "algorithm": MUON, "lr": 0.02, "momentum": 0.95,
                               "weight_decay": 0.1, "in_out": True}], ns_dtype=torch.bfloat16)
        theirs = torch.optim.Muon([linear], lr=0.02, momentum=0.95, weight_decay=0.1)
        for _ in range(3):
            grad = torch.randn(n_in, n_out, generator=gen)
            conv.grad, linear.grad = grad.clone(), grad.T.contiguous()
            mine.step(), theirs.step()
        assert torch.equal(conv.detach().T, linear.detach())
        assert torch.equal(mine.state[conv]["momentum_buffer"].T, theirs.state[linear]["momentum_buffer"])


def test_the_adamw_groups_step_exactly_as_torchs_fused_adamw():
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((50, 8), (8,))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    settings = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    mine = MuonWithAdamW([{"params": params, "algorithm": ADAMW, "fused": True, **settings}])
    theirs = torch.optim.AdamW(copies, fused=True, **settings)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        mine.step(), theirs.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    for p, q in zip(params, copies):
        assert mine.state[p].keys() == theirs.state[q].keys()
        assert all(torch.equal(mine.state[p][k], theirs.state[q][k]) for k in mine.state[p])


# -- real runs ------------------------------------------------------------------------------------
@pytest.fixture
def muon_cfg(tiny_cfg):
    return tiny_cfg.replace(optimizer="muon", muon_lr=0.02)


def group_lrs_at_each_step(monkeypatch) -> list[dict[str, float]]:
    """Every step of MuonWithAdamW from now on appends {algorithm: lr} of its groups to the list."""
    seen = []
    real_step = MuonWithAdamW.step

    def step(self, closure=None):
        seen.append({g["algorithm"]: g["lr"] for g in self.param_groups})
        return real_step(self, closure)
    monkeypatch.setattr(MuonWithAdamW, "step", step)
    return seen


def test_a_muon_run_trains_and_each_group_follows_the_schedule_from_its_own_peak(muon_cfg, tiny_data,
                                                                                  monkeypatch):
    seen = group_lrs_at_each_step(monkeypatch)
    rec = ListRecorder()
    result = train(muon_cfg.replace(epochs=1), rec, data=tiny_data, **QUIET)
    assert result.status == "completed" and len(seen) == 30
    assert seen == [{ADAMW: lr_at(s, muon_cfg, 30), MUON: lr_at(s, muon_cfg, 30, 0.02)} for s in range(30)]
    assert [m["lr"] for _, m in rec.steps] == [lr_at(s, muon_cfg, 30) for s in range(30)]
    losses = [m["loss"] for _, m in rec.steps]
    # From ln(512) = 6.2 at the start; 30 steps took 0.9 nats off here: a wide margin below that.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses


@pytest.mark.slow
def test_an_interrupted_muon_run_resumes_bit_identically(muon_cfg, tiny_data, tmp_path):
    from safetensors.torch import load_file

    # Accumulation and dropout, as tests/test_resume.py: every step draws random numbers.
    cfg = muon_cfg.replace(micro_batch=4, grad_accum=2, dropout=0.1, save_every=10, keep_checkpoints=10)
    reference = ListRecorder()
    train(cfg.replace(out_dir=str(tmp_path / "reference")), reference, data=tiny_data, **QUIET)
    run = cfg.replace(out_dir=str(tmp_path / "run"))
    first = SignalAt(13)
    with pytest.raises(TrainingInterrupted):
        train(run, first, data=tiny_data, **QUIET)
    second = ListRecorder()
    result = train(run.replace(resume="auto"), second, data=tiny_data, **QUIET)
    assert result.status == "completed" and min(second.losses()) == 14
    assert {**first.losses(), **second.losses()} == reference.losses()       # every step's loss, exactly
    got, expected = (load_file(str(tmp_path / d / "final_model" / "model.safetensors")) for d in ("run", "reference"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_gradient_accumulation_gives_the_same_steps(muon_cfg, tiny_data, tmp_path):
    losses = []
    for micro_batch, grad_accum in ((8, 1), (4, 2)):
        rec = ListRecorder()
        train(muon_cfg.replace(micro_batch=micro_batch, grad_accum=grad_accum, max_steps=10,
                               out_dir=str(tmp_path / f"{micro_batch}x{grad_accum}")), rec, data=tiny_data, **QUIET)
        losses.append([m["loss"] for _, m in rec.steps])
    assert len(losses[0]) == 10 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_the_gradient_scaler_skips_an_overflowing_step_without_touching_either_state():
    model = build_model(SMALL, 300, 0)
    optimizer = build_optimizer(model, SMALL)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(6))

    def step(overflow):
        loss = next_token_loss(model, ids)
        scaler.scale(loss * (math.inf if overflow else 1.0)).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step(overflow=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {i: {k: t.clone() for k, t in e.items()} for i, e in optimizer.state_dict()["state"].items()}
    step(overflow=True)
    assert scaler.get_scale() == 2.0 ** 15                          # the scaler saw the inf and backed off
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(t, after[i][k]) for i, e in state_before.items() for k, t in e.items())
    step(overflow=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_with_an_enabled_scaler_records_its_skips(muon_cfg, tiny_data, monkeypatch):
    # As tests/test_faults.py: gradients that overflow in the first 3 optimizer steps.
    import trainer.setup
    from trainer.device import Placement

    monkeypatch.setattr(Placement, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    real_build, calls = trainer.setup.build_model, []

    def build_overflowing_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.transformer.wte.weight.register_hook(
            lambda grad: calls.append(1) or (grad * math.inf if len(calls) <= 3 else grad))
        return model
    monkeypatch.setattr(trainer.setup, "build_model", build_overflowing_model)
    rec = ListRecorder()
    result = train(muon_cfg.replace(max_steps=8), rec, data=tiny_data, **QUIET)
    assert result.status == "completed" and result.steps == 8
    skips = [(step, d["scale"]) for kind, step, d in rec.events if kind == "scaler_skip"]
    assert skips == [(1, 2.0 ** 15), (2, 2.0 ** 14), (3, 2.0 ** 13)]
    assert all(math.isfinite(m["loss"]) for _, m in rec.steps) and "nonfinite" not in rec.event_kinds()


def test_out_of_memory_in_the_first_update_is_redone_at_half_the_micro_batch(muon_cfg, tiny_data, monkeypatch):
    # The OOM ladder's update path (as tests/test_faults.py): the first step raises out of memory
    # after unscale_, with the optimizer's state half made; it is cleared and the step redone.
    from trainer.device import Placement

    monkeypatch.setattr(Placement, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    cfg = muon_cfg.replace(micro_batch=8, grad_accum=2, max_steps=6)
    losses = []
    for inject in ("", "1"):
        monkeypatch.setenv("TRAINER_INJECT_OOM_UPDATE", inject)
        rec = ListRecorder()
        result = train(cfg.replace(out_dir=f"{cfg.out_dir}-{inject or 'plain'}"), rec, data=tiny_data, **QUIET)
        assert result.status == "completed" and result.steps == 6, result.reason
        losses.append([m["loss"] for _, m in rec.steps])
    ooms = [(step, d["new_micro_batch"], d["new_grad_accum"]) for kind, step, d in rec.events if kind == "oom"]
    assert ooms == [(1, 4, 4)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_two_processes_train_with_muon_as_one(tmp_path):
    # DDP for real (torchrun, gloo), as tests/test_distributed.py: 2 processes of 4 x 1 against one of
    # 4 x 2, the same 8 sequences a step; Muon orthogonalises the same averaged gradients on each rank.
    import random

    from test_distributed import STEPS, WORDS, assert_close, flags, run, step_losses

    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))})
                              + "\n" for _ in range(600)))
    muon = {"optimizer": "muon", "save-every": 40}
    run(1, flags(tmp_path / "one", tmp_path / "cache", corpus, **muon, **{"grad-accum": 2}))
    run(2, flags(tmp_path / "two", tmp_path / "cache", corpus, **muon))
    assert_close(step_losses(f"{tmp_path / 'two'}.db"), step_losses(f"{tmp_path / 'one'}.db"), range(1, STEPS + 1))


# -- checkpoints ------------------------------------------------------------------------------
def trained(cfg, seed, steps=2):
    model = build_model(cfg.replace(seed=seed), 300, 0)
    optimizer = build_optimizer(model, cfg)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 17))
        next_token_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_a_checkpoint_holds_and_restores_both_states_exactly(tmp_path):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, optimizer = trained(SMALL, seed=0)
    expected = optimizer.state_dict()
    assert all(isinstance(t, torch.Tensor) for e in expected["state"].values() for t in e.values())
    kinds = {frozenset(e) for e in expected["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    saved = save_checkpoint(tmp_path / "c", model=model, optimizer=optimizer, scaler=scaler, kind="periodic",
                            state=TrainState(step=2), config=SMALL.to_dict())
    # Loaded into parts with other weights and moments, built with another --muon-lr: the state is the
    # checkpoint's, the peak lrs are this run's config's (what the schedule scales).
    model2, optimizer2 = trained(SMALL.replace(muon_lr=0.05), seed=1, steps=1)
    load_checkpoint(saved.path, model=model2, optimizer=optimizer2, scaler=scaler)
    got = optimizer2.state_dict()
    assert got["state"].keys() == expected["state"].keys()
    for idx, entry in expected["state"].items():
        assert all(torch.equal(t, got["state"][idx][k]) for k, t in entry.items()), idx
    assert [g["base_lr"] for g in got["param_groups"]] == [SMALL.lr, SMALL.lr, 0.05]
    # through the checkpoint's JSON: betas come back as a list
    strip = lambda groups: json.loads(json.dumps([{k: v for k, v in g.items() if k != "base_lr"} for g in groups]))
    assert strip(got["param_groups"]) == strip(expected["param_groups"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_an_optimizer_state_saved_before_the_peaks_were_stored_still_loads():
    adamw = SMALL.replace(optimizer="adamw", lr=4e-3)
    model, optimizer = trained(adamw, seed=0, steps=1)
    old = optimizer.state_dict()
    old["param_groups"] = [{k: v for k, v in g.items() if k != "base_lr"} for g in old["param_groups"]]
    fresh = build_optimizer(model, adamw)
    fresh.load_state_dict(old)
    assert [g["base_lr"] for g in fresh.param_groups] == [4e-3, 4e-3]


@pytest.mark.parametrize("saved, resumed", [("adamw", "muon"), ("muon", "adamw")])
def test_the_other_optimizers_checkpoint_is_refused_naming_the_flag(tmp_path, saved, resumed):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, optimizer = trained(SMALL.replace(optimizer=saved), seed=0, steps=1)
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=optimizer, scaler=scaler, kind="periodic",
                           state=TrainState(step=1), config=SMALL.to_dict()).path
    model2, optimizer2 = trained(SMALL.replace(optimizer=resumed), seed=0, steps=0)
    with pytest.raises(CheckpointError, match=f"saved by --optimizer {saved} and this run has --optimizer "
                                              f"{resumed}; resume with --optimizer {saved}, or start a fresh run"):
        load_checkpoint(path, model=model2, optimizer=optimizer2, scaler=scaler)


# -- the flags and the LR finder ------------------------------------------------------------------
def test_bad_muon_settings_name_their_flag():
    problems = TrainConfig(optimizer="lion", muon_lr=0.0, muon_weight_decay=-1.0, muon_momentum=1.0).problems()
    assert "--optimizer 'lion': choose one of adamw, muon" in problems
    assert "--muon-lr 0.0: use a positive learning rate such as 0.02" in problems
    assert any(p.startswith("--muon-weight-decay -1.0: use a value >= 0") for p in problems)
    assert "--muon-momentum 1.0: use a value in [0, 1) such as 0.95" in problems
    with pytest.raises(ConfigError, match="--muon-lr"):
        TrainConfig(muon_lr=math.nan).check()


def test_the_lr_finder_sweeps_muon_at_its_ratio_to_lr(tiny_base_cfg, tiny_data, monkeypatch):
    from trainer.device import place
    from trainer.lr_find import FinderSettings, range_test

    cfg = tiny_base_cfg.replace(optimizer="muon", lr=1e-3, muon_lr=0.02)
    seen = group_lrs_at_each_step(monkeypatch)
    settings = FinderSettings(1e-5, 1e-2, 12)
    model = build_model(cfg, tiny_data.vocab_size, tiny_data.tokenizer.eos_token_id)
    curve = range_test(model, cfg, tiny_data, place(cfg), settings)
    assert len(curve.lrs) == len(seen) == 12 and all(math.isfinite(loss) for loss in curve.losses)
    assert [s[ADAMW] for s in seen] == list(curve.lrs)                      # the swept lr itself
    assert [s[MUON] for s in seen] == [lr * (0.02 / 1e-3) for lr in curve.lrs]    # Muon keeps 20x


def test_small_cpu_matrices_are_orthogonalised_on_one_thread_and_the_pool_is_restored(monkeypatch):
    import trainer.muon as muon

    seen = []
    real = muon.orthogonalise
    monkeypatch.setattr(muon, "orthogonalise", lambda u, dtype: seen.append(torch.get_num_threads()) or real(u, dtype))
    weight = torch.nn.Parameter(torch.randn(64, 32))
    weight.grad = torch.randn(64, 32)
    opt = muon.MuonWithAdamW([{"algorithm": muon.MUON, "params": [weight], "lr": 0.02, "momentum": 0.95,
                               "weight_decay": 0.0, "in_out": False}])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt.step()
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(muon, "CPU_ONE_THREAD_ENTRIES", 100)     # a "large" matrix: every thread
        opt.step()
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
