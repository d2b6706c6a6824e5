"""MFU (trainer.flops): FLOPs per token from a model's shape, the machine's measured peak and its
cache, and the epoch's mfu of a real tiny run on the CPU.

Nothing here depends on the machine's speed: the peak is only asserted positive and finite, a
probe is counted by wrapping the probe function, and the run's mfu is checked against the
formula applied to its own tokens/s and the peak it used.
"""
import json
import math

import pytest
import torch

from trainer import flops
from trainer.flops import (CACHE_NAME, cache_file, flops_per_token, machine_key, measured_peak,
                           measured_peak_flops, peak_flops)
from trainer.run import train
from trainer_fixtures import ListRecorder

CPU = torch.device("cpu")


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """The cache in tmp_path/cache, this process's memory of peaks emptied, and every probe
    counted (the real probe runs): returns the list of (device, dtype) probed."""
    monkeypatch.setenv("SMALLGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(flops, "_MEASURED", {})
    calls, real = [], flops.probe_peak_flops

    def counted(device, dtype):
        calls.append((device, dtype))
        return real(device, dtype)

    monkeypatch.setattr(flops, "probe_peak_flops", counted)
    return calls


def forget_in_memory(monkeypatch):
    """As a new process would start: only the cache file remembers."""
    monkeypatch.setattr(flops, "_MEASURED", {})


# -- FLOPs per token -----------------------------------------------------------------------
def test_flops_per_token_of_gpt2_leaves_out_position_embeddings_and_counts_tied_embeddings_once(tiny_cfg):
    from trainer.model import build_model

    model = build_model(tiny_cfg, 512, 0)
    c = model.config
    vocab, width, layers, positions = c.vocab_size, c.n_embd, c.n_layer, c.n_positions
    assert model.lm_head.weight is model.transformer.wte.weight       # tied: one matrix, counted once
    # per block: two LayerNorms (2 x 2E), attention qkv (E x 3E + 3E) and projection (E x E + E),
    # MLP up (E x 4E + 4E) and down (4E x E + E); then the final LayerNorm and the token embedding
    per_block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (4 * width * width + 4 * width) + (4 * width * width + width)
    without_positions = vocab * width + layers * per_block + 2 * width
    assert sum(p.numel() for p in model.parameters()) == without_positions + positions * width
    expected = 6 * without_positions + 12 * layers * width * tiny_cfg.block_size
    assert flops_per_token(model, tiny_cfg.block_size) == expected


def test_flops_per_token_of_llama_counts_every_parameter_it_has_no_learned_positions():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 64) == 6 * n + 12 * 2 * 32 * 64


# -- the measured peak and its cache ----------------------------------------------------------
def test_the_peak_is_measured_once_then_read_from_the_cache_file(probes, tmp_path, monkeypatch):
    first = measured_peak(CPU, torch.float32)
    assert probes == [(CPU, torch.float32)] and math.isfinite(first.flops) and first.flops > 0
    assert "float32 matmuls" in first.how
    stored = json.loads((tmp_path / "cache" / CACHE_NAME).read_text())
    assert stored[machine_key(CPU, torch.float32)]["flops"] == first.flops

    assert measured_peak(CPU, torch.float32) == first          # the same process: from memory
    forget_in_memory(monkeypatch)
    assert measured_peak(CPU, torch.float32) == first          # a new process: from the file
    assert len(probes) == 1


@pytest.mark.parametrize("content", ["{not json", "[1, 2]",
                                     json.dumps({"KEY": {"flops": -1.0, "how": "x", "measured_at": "d"}}),
                                     json.dumps({"KEY": {"flops": "fast", "how": "x", "measured_at": "d"}})])
def test_a_corrupt_cache_is_measured_again_and_rewritten(probes, tmp_path, content):
    key = machine_key(CPU, torch.float32)
    path = tmp_path / "cache" / CACHE_NAME
    path.parent.mkdir()
    path.write_text(content.replace("KEY", key))
    peak = measured_peak_flops(CPU, torch.float32)
    assert len(probes) == 1 and peak > 0
    assert json.loads(path.read_text())[key]["flops"] == peak


def test_an_unwritable_cache_folder_still_gives_a_peak(probes, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")      # the cache folder would have to be made inside a file: fails even as root
    monkeypatch.setenv("SMALLGPT_CACHE", str(blocker / "cache"))
    peak = measured_peak_flops(CPU, torch.float32)
    assert peak > 0 and len(probes) == 1
    assert measured_peak_flops(CPU, torch.float32) == peak and len(probes) == 1    # kept in memory


def test_the_cache_folder_follows_smallgpt_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLGPT_CACHE", str(tmp_path / "mine"))
    assert cache_file() == tmp_path / "mine" / CACHE_NAME
    monkeypatch.delenv("SMALLGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file() == tmp_path / "xdg" / "smallgpt-lab" / CACHE_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_file() == tmp_path / "home" / ".cache" / "smallgpt-lab" / CACHE_NAME


def test_the_probe_leaves_the_runs_random_streams_alone(probes):
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    measured_peak(CPU, torch.float32)
    assert len(probes) == 1 and torch.equal(torch.rand(3), expected)


def test_each_dtype_has_its_own_peak(probes):
    assert machine_key(CPU, torch.float32) != machine_key(CPU, torch.bfloat16)
    measured_peak(CPU, torch.float32)
    measured_peak(CPU, torch.bfloat16)
    assert probes == [(CPU, torch.float32), (CPU, torch.bfloat16)]


def fake_oom_above(limit, tried):
    """A probe's products on a simulated GPU: out of memory above ``limit``, else computed on the CPU
    (no tensor can live on the simulated GPU); ``tried`` gets every size asked for."""
    real = flops._matmul_rate

    def rate(n, device, dtype):
        tried.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {n}x{n} (simulated)")
        return real(n, CPU, torch.float32)
    return rate


def test_a_gpu_without_room_for_the_probe_halves_it_then_has_no_mfu(probes, simulated_gpu, monkeypatch, tmp_path):
    simulated_gpu("T4")
    gpu, tried = torch.device("cuda:0"), []
    monkeypatch.setattr(flops, "_matmul_rate", fake_oom_above(1024, tried))
    peak = measured_peak(gpu, torch.float16)
    assert tried == [8192, 4096, 2048, 1024] and "1024x1024 float16 matmuls on Tesla T4" in peak.how

    tried.clear()
    monkeypatch.setattr(flops, "_matmul_rate", fake_oom_above(0, tried))
    assert flops.utilisation(1e6, 1e3, gpu, dtype=torch.bfloat16) is None and tried == [8192, 4096, 2048, 1024]
    assert list(json.loads((tmp_path / "cache" / CACHE_NAME).read_text())) == [machine_key(gpu, torch.float16)]


def test_fp32_on_a_gpu_is_keyed_by_whether_it_runs_as_tf32(simulated_gpu, monkeypatch):
    simulated_gpu("A100")
    gpu = torch.device("cuda:0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    plain = machine_key(gpu, torch.float32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    assert "cuda | NVIDIA A100-SXM4-40GB | float32 |" in plain
    assert machine_key(gpu, torch.float32) == plain.replace("float32", "float32 (TF32)")


def test_the_vendor_table_stays_as_a_cross_check():
    assert peak_flops("Tesla T4") == 65e12 and peak_flops("NVIDIA H200") == 989e12 and peak_flops("GTX 480") is None


# -- MFU of a real run -----------------------------------------------------------------------
def test_a_cpu_run_reports_its_mfu_in_every_epochs_metrics(tiny_cfg, tiny_data):
    from trainer.model import build_model

    rec = ListRecorder()
    train(tiny_cfg.replace(epochs=1), rec, data=tiny_data)
    epoch = rec.epochs[0][1]
    assert tiny_cfg.precision == "fp32" and epoch["tokens_per_s"] > 0
    assert 0 < epoch["mfu"] <= 1
    # the formula, on the run's own tokens/s and the peak it measured (kept in memory since)
    per_token = flops_per_token(build_model(tiny_cfg, tiny_data.vocab_size, 0), tiny_cfg.block_size)
    assert epoch["mfu"] == pytest.approx(per_token * epoch["tokens_per_s"] / measured_peak_flops(CPU, torch.float32))


def test_no_mfu_without_a_finite_tokens_per_s(probes):
    assert flops.utilisation(1e6, math.nan, CPU) is None and probes == []


# -- the benchmark's report ------------------------------------------------------------------
def test_the_bench_reports_the_measured_peak_how_it_was_measured_and_the_vendors_beside_it():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # bench/ is not installed
    from bench.common import row
    from bench.gpu import vendor_peak, vendor_rows
    from bench.report import peak_notes
    from bench.throughput import MfuFigures, peak_record

    how = "best of 3 timed 8192x8192 bfloat16 matmuls on NVIDIA H100 80GB HBM3"
    record = peak_record(flops.Peak(494.5e12, how, "2026-12-06"), torch.bfloat16,
                         vendor_peak("NVIDIA H100 80GB HBM3", torch.bfloat16))
    assert vendor_peak("NVIDIA H100 80GB HBM3", torch.float32) is None     # the datasheet figure is 16-bit
    mfu = MfuFigures([row("MFU trainer", [40.0, 60.0], "%")], [record])
    assert vendor_rows(mfu)[0]["values"] == pytest.approx([20.0, 30.0])     # 494.5 / 989: half the MFU
    assert peak_notes({"peaks": [record]}) == [(
        f"MFU against the measured bfloat16 peak, 494.5 TFLOP/s: {how}, measured 2026-12-06 and cached per "
        "machine (trainer.flops); the vendor's datasheet peak is 989.0 TFLOP/s (measured / datasheet 0.50)")]
