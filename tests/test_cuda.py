"""The CUDA paths on a real GPU: fp16 with its gradient scaler, a real out-of-memory recovery,
``--micro-batch auto``. CI and this project's machines have no GPU, so these skip there (the
reason is printed); on Kaggle or Colab run ``python -m pytest tests/test_cuda.py -rs``.

The out-of-memory tests make a small GPU out of a big one: ``set_per_process_memory_fraction``
caps what the caching allocator may take, and going past the cap raises the same
``torch.cuda.OutOfMemoryError`` as a full card.
"""
import pytest
import torch

import expdb
from trainer.run import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none visible): the CPU tests inject these faults")

EFFECTIVE = 64


@pytest.fixture
def gpu_cfg(tiny_cfg):
    return tiny_cfg.replace(device="cuda", block_size=128, dropout=0.0, max_steps=4, epochs=3, eval_every=1000)


@pytest.fixture
def capped_gpu():
    """Cap this process's GPU memory; returns a function setting the cap in bytes. Undone after."""
    total = torch.cuda.get_device_properties(0).total_memory

    def cap(n_bytes: int) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, n_bytes / total), 0)
    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def run(cfg, data, tmp_path, name):
    db = expdb.open(tmp_path / f"{name}.db")
    return train(cfg.replace(out_dir=str(tmp_path / name)), db.recorder(), data=data, log=print), db


def peak_bytes(cfg, data, tmp_path, name) -> int:
    """Peak GPU memory of one optimizer step of ``cfg``."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)
    result, _ = run(cfg.replace(max_steps=1), data, tmp_path, name)
    assert result.status == "completed"
    return torch.cuda.max_memory_allocated(0)


def tokens_per_step(db, run_id):
    return set(db.steps(run_id).tokens_seen.diff().dropna())


def test_fp16_trains_with_its_gradient_scaler(tiny_cfg, tiny_data, tmp_path):
    # 2 epochs of 30 steps, as the CPU tests train, in fp16 autocast with loss scaling
    result, db = run(tiny_cfg.replace(device="cuda", precision="fp16"), tiny_data, tmp_path, "fp16")
    assert result.status == "completed" and result.steps == 60
    assert db.run(result.run_id).precision == "fp16"
    loss = db.steps(result.run_id).loss
    assert loss.notna().all() and loss.iloc[-5:].mean() < loss.iloc[:5].mean()
    events = db.events(result.run_id)
    assert not (events.kind == "nonfinite").any()
    # each overflow the scaler skipped is an event; in 60 steps its scale can only have halved
    scales = [d["scale"] for d in events[events.kind == "scaler_skip"].detail]
    assert scales == [2.0 ** 16 / 2 ** (k + 1) for k in range(len(scales))]
    epoch = db.epochs(result.run_id).iloc[-1]
    assert epoch.mem_gpu_peak_mb > 0 and epoch.mem_gpu_reserved_mb >= epoch.mem_gpu_allocated_mb


def test_a_micro_batch_that_does_not_fit_is_halved_until_it_does(gpu_cfg, full_tiny_data, tmp_path, capped_gpu):
    cfg = gpu_cfg.replace(precision="fp32")
    small = peak_bytes(cfg.replace(micro_batch=8, grad_accum=EFFECTIVE // 8), full_tiny_data, tmp_path, "p8")
    big = peak_bytes(cfg.replace(micro_batch=EFFECTIVE, grad_accum=1), full_tiny_data, tmp_path, "p64")
    assert big > 2 * small, "activations must dominate for this test to mean anything"
    capped_gpu(int(1.2 * small))        # micro-batch 8 fits, micro-batch 64 does not
    result, db = run(cfg.replace(micro_batch=EFFECTIVE, grad_accum=1), full_tiny_data, tmp_path, "oom")
    assert result.status == "completed" and result.steps == cfg.max_steps
    ooms = db.events(result.run_id).query("kind == 'oom'")
    assert len(ooms) >= 1 and all("out of memory" in d["error"].lower() for d in ooms.detail)
    sizes = [(d["new_micro_batch"], d["new_grad_accum"]) for d in ooms.detail]
    assert all(m * a == EFFECTIVE for m, a in sizes) and sizes[-1][0] < EFFECTIVE
    assert tokens_per_step(db, result.run_id) == {EFFECTIVE * cfg.block_size}   # the effective batch kept


def test_micro_batch_auto_picks_one_that_fits(gpu_cfg, full_tiny_data, tmp_path, capped_gpu):
    cfg = gpu_cfg.replace(precision="fp32")
    small = peak_bytes(cfg.replace(micro_batch=8, grad_accum=EFFECTIVE // 8), full_tiny_data, tmp_path, "p8")
    capped_gpu(int(1.2 * small))
    result, db = run(cfg.replace(micro_batch=EFFECTIVE, grad_accum=1, auto_micro_batch=True), full_tiny_data,
                     tmp_path, "auto")
    assert result.status == "completed"
    assert not (db.events(result.run_id).kind == "oom").any()    # it started at a size that fits
    assert tokens_per_step(db, result.run_id) == {EFFECTIVE * cfg.block_size}


def test_micro_batch_one_that_does_not_fit_ends_the_run_with_its_reason(gpu_cfg, full_tiny_data, tmp_path,
                                                                        capped_gpu):
    # A long context and many heads: one sequence's activations dwarf the weights and AdamW's state.
    cfg = gpu_cfg.replace(precision="fp32", block_size=1024, n_embd=64, n_head=16, n_layer=2,
                          micro_batch=1, grad_accum=2)
    one = peak_bytes(cfg, full_tiny_data, tmp_path, "p1")
    n_params = expdb.open(tmp_path / "p1.db").runs()["n_params"].to_numpy().ravel()[0]
    static = 16 * int(n_params)         # fp32 weights, gradients and AdamW's two moments
    assert one > 3 * static, "activations must dominate for this test to mean anything"
    capped_gpu(int(static + (one - static) / 3))
    result, db = run(cfg, full_tiny_data, tmp_path, "mb1")
    assert result.status == "failed" and "out of memory at micro-batch 1" in result.reason
    assert db.run(result.run_id).status == "failed"


def test_tf32_is_on_for_fp32_on_ampere_and_newer_only(tiny_cfg):
    from trainer.device import place

    major, minor = torch.cuda.get_device_capability(0)
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        fp32 = place(tiny_cfg.replace(device="cuda", precision="fp32"))
        fp32.apply()
        assert fp32.tf32 == ((major, minor) >= (8, 0))                      # a T4 is 7.5: off
        assert ("TF32 matmuls" in fp32.description) == fp32.tf32
        assert (torch.backends.cuda.matmul.fp32_precision == "tf32") == fp32.tf32
        # native bf16 only: torch.cuda.is_bf16_supported() counts emulation and answers True on a T4
        half = place(tiny_cfg.replace(device="cuda", precision="bf16" if (major, minor) >= (8, 0) else "fp16"))
        assert not half.tf32 and "TF32" not in half.description           # autocast already uses tensor cores
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_auto_precision_is_this_gpus_native_one(tiny_cfg):
    from trainer.device import place

    capability = torch.cuda.get_device_capability(0)
    native = "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"   # P100: fp32
    assert place(tiny_cfg.replace(device="cuda", precision="auto")).precision == native
