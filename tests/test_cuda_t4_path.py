"""The T4's code path forced on a bigger GPU, and what only a real GPU can show: fp16 with its
gradient scaler and the memory-efficient attention kernel (flash disabled, as on sm_75) under a
15 GB cap (``set_per_process_memory_fraction``), a real out-of-memory error recovered there,
``--micro-batch auto`` under the same cap, bf16 where the GPU has it, a resume on the GPU giving the
uninterrupted run's weights, and NVML sampling. Skipped without CUDA; ``.ci/gpu-check`` runs it.

The out-of-memory sizes are measured, not guessed: the peak of one step at two micro-batches
gives the memory a sequence takes, and the micro-batch asked for is the smallest power of two
whose estimate is twice the cap (so the halving must happen, and ends below the cap).
"""
import os
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (before its first use)

import pytest
import torch
from safetensors.torch import load_file

import expdb
from trainer.checkpoints import MODEL_FILE
from trainer.errors import TrainingInterrupted
from trainer.gpu_monitor import start_gpu_monitor
from trainer.run import train
from trainer_fixtures import ListRecorder, SignalAt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none visible): .ci/gpu-check runs these on one")

T4_BYTES = 15 * 10 ** 9          # a T4's 16 GB card as torch sees it, less the CUDA context
QUIET = dict(log=lambda *_: None)


@pytest.fixture
def t4_like():
    """This process sees a T4: 15 GB of memory and no flash attention (sm_75 has none), so
    scaled_dot_product_attention takes the memory-efficient kernel. Undone after."""
    total = torch.cuda.get_device_properties(0).total_memory
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total), 0)
    torch.backends.cuda.enable_flash_sdp(False)
    yield min(T4_BYTES, total)
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def big_data(tiny_base_cfg):
    """Enough tokens for micro-batches of long sequences: three tenths of the standard library."""
    from trainer.data import prepare_data

    return prepare_data(tiny_base_cfg.replace(subset=0.3), log=lambda *_: None)


@pytest.fixture
def big_cfg(tiny_base_cfg, tmp_path):
    # GPT-2 small's shape with a 512-token vocabulary: activations, not weights, fill the card
    return tiny_base_cfg.replace(subset=0.3, device="cuda", precision="fp16", n_layer=12, n_embd=768, n_head=12,
                                 block_size=1024, dropout=0.0, epochs=1, max_steps=3, eval_every=1000,
                                 eval_batches=1, out_dir=str(tmp_path / "run"))


def run(cfg, data, tmp_path, name, **kw):
    db = expdb.open(tmp_path / f"{name}.db")
    return train(cfg.replace(out_dir=str(tmp_path / name)), db.recorder(), data=data, **QUIET, **kw), db


def peak_bytes(cfg, data, tmp_path, name) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)
    result, _ = run(cfg.replace(max_steps=1), data, tmp_path, name)
    assert result.status == "completed"
    return torch.cuda.max_memory_allocated(0)


def too_big_micro_batch(cfg, data, tmp_path, cap: int) -> int:
    """The smallest power of two whose estimated peak is twice ``cap``."""
    two, four = (peak_bytes(cfg.replace(micro_batch=m, grad_accum=1), data, tmp_path, f"peak{m}") for m in (2, 4))
    per_sequence = (four - two) / 2
    assert per_sequence > 0
    micro = 4
    while two + per_sequence * (micro - 2) < 2 * cap:
        micro *= 2
    assert len(data.train) > 3 * micro * cfg.block_size, "not enough tokens for three steps"
    return micro


def tokens_per_step(db, run_id):
    return set(db.steps(run_id).tokens_seen.diff().dropna())


def test_the_t4_path_takes_the_memory_efficient_attention_kernel_in_fp16(big_cfg, big_data, t4_like):
    from trainer.model import build_model

    model = build_model(big_cfg, big_data.vocab_size, big_data.tokenizer.eos_token_id).cuda()
    batch = torch.zeros(2, big_cfg.block_size, dtype=torch.long, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.float16):
            model(input_ids=batch)
    kernels = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    assert "aten::_scaled_dot_product_efficient_attention" in kernels, kernels
    assert not any("flash" in k for k in kernels), kernels


def test_fp16_under_a_15gb_cap_recovers_a_real_out_of_memory_by_halving(big_cfg, big_data, tmp_path, t4_like):
    micro = too_big_micro_batch(big_cfg, big_data, tmp_path, t4_like)
    result, db = run(big_cfg.replace(micro_batch=micro, grad_accum=1), big_data, tmp_path, "oom")
    assert result.status == "completed" and result.steps == big_cfg.max_steps, result.reason
    record = db.run(result.run_id)
    assert record.precision == "fp16"
    ooms = db.events(result.run_id).query("kind == 'oom'")
    assert len(ooms) >= 1 and all("out of memory" in d["error"].lower() for d in ooms.detail)
    sizes = [(d["new_micro_batch"], d["new_grad_accum"]) for d in ooms.detail]
    assert all(m * a == micro for m, a in sizes) and sizes[-1][0] < micro
    assert tokens_per_step(db, result.run_id) == {micro * big_cfg.block_size}     # the effective batch kept
    assert torch.cuda.max_memory_reserved(0) <= t4_like
    print(f"T4 path: asked micro-batch {micro}, ran at {sizes[-1][0]} x {sizes[-1][1]} after {len(ooms)} OOM(s); "
          f"peak reserved {torch.cuda.max_memory_reserved(0) / 2 ** 30:.1f} GiB under a "
          f"{t4_like / 2 ** 30:.1f} GiB cap")


def test_micro_batch_auto_under_the_15gb_cap_starts_at_a_size_that_fits(big_cfg, big_data, tmp_path, t4_like):
    micro = too_big_micro_batch(big_cfg, big_data, tmp_path, t4_like)
    torch.cuda.reset_peak_memory_stats(0)
    result, db = run(big_cfg.replace(micro_batch=micro, grad_accum=1, auto_micro_batch=True), big_data, tmp_path,
                     "auto")
    assert result.status == "completed" and result.steps == big_cfg.max_steps, result.reason
    assert not (db.events(result.run_id).kind == "oom").any()      # no size it picked ran out at step 2 or 3
    assert tokens_per_step(db, result.run_id) == {micro * big_cfg.block_size}
    print(f"--micro-batch auto from {micro}: peak reserved {torch.cuda.max_memory_reserved(0) / 2 ** 30:.1f} GiB")


def test_bf16_on_a_gpu_that_has_it(tiny_cfg, tiny_data, tmp_path):
    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 or newer (this GPU emulates it)")
    result, db = run(tiny_cfg.replace(device="cuda", precision="auto"), tiny_data, tmp_path, "bf16")
    assert result.status == "completed" and db.run(result.run_id).precision == "bf16"
    loss = db.steps(result.run_id).loss
    assert loss.notna().all() and loss.iloc[-5:].mean() < loss.iloc[:5].mean()
    assert not (db.events(result.run_id).kind == "scaler_skip").any()    # bf16 needs no scaler


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "final_model" / MODEL_FILE))


def largest_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_gpu_resume_gives_the_weights_of_the_uninterrupted_run(tiny_cfg, tiny_data, tmp_path, precision):
    if precision == "bf16" and torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 or newer")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        cfg = tiny_cfg.replace(device="cuda", precision=precision, micro_batch=4, grad_accum=2, dropout=0.1,
                               save_every=10, keep_checkpoints=10)
        refs = []
        for name in ("ref1", "ref2"):
            train(cfg.replace(out_dir=str(tmp_path / name)), ListRecorder(), data=tiny_data, **QUIET)
            refs.append(final_weights(tmp_path / name))
        out = str(tmp_path / "resumed")
        with pytest.raises(TrainingInterrupted):
            train(cfg.replace(out_dir=out), SignalAt(13), data=tiny_data, **QUIET)
        result = train(cfg.replace(out_dir=out, resume="auto"), ListRecorder(), data=tiny_data, **QUIET)
    finally:
        torch.use_deterministic_algorithms(False)
    assert result.status == "completed" and result.resumed_from
    noise, resumed = largest_difference(*refs), largest_difference(final_weights(out), refs[0])
    print(f"resume {precision}: largest weight difference {resumed:.3g} (two uninterrupted runs: {noise:.3g})")
    if noise == 0:
        assert resumed == 0, "this GPU is deterministic here, so the resumed weights must be equal"
    else:                      # a kernel without a deterministic version: within what the GPU itself varies
        assert resumed <= 4 * noise


def test_nvml_samples_the_run_gpu(tiny_cfg, tiny_data, tmp_path):
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (the 'gpu' extra)")
    def fast(interval_s, gpus):                                          # a sample every 50 ms
        return start_gpu_monitor(0.05, gpus)
    result, db = run(tiny_cfg.replace(device="cuda", precision="auto"), tiny_data, tmp_path, "nvml",
                     gpu_monitor=fast)
    assert result.status == "completed"
    epochs = db.epochs(result.run_id)
    assert epochs.gpu_util_pct.notna().all() and (epochs.gpu_mem_used_mb > 0).all()
    print("NVML: " + ", ".join(f"epoch {e.epoch}: util {e.gpu_util_pct:.0f}% (max {e.gpu_util_max_pct:.0f}%), "
                               f"{e.gpu_mem_used_mb:.0f} MB" for e in epochs.itertuples()))
