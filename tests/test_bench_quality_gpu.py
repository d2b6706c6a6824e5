"""``python -m bench quality --device cuda``, checked on the CPU: the refusal without a GPU, and the
device, precision and sizes each contender is given. Nothing here runs on a GPU: the simulated GPU
(tests/simulated_gpu.py) only answers torch's questions. .ci/gpu-check's bench_quality step is
what runs it on one.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))    # bench/ is a directory of the checkout, not part of the installed package

from bench import quality, quality_figures  # noqa: E402
from bench.__main__ import main, parse_args  # noqa: E402
from bench.curves import CudaPeak, Validation, Watch  # noqa: E402
from bench.gpu import FULL as GPU_PART  # noqa: E402
from bench.hf_trainer import default_arguments  # noqa: E402
from bench.quality_sizes import NO_EVAL, SMOKE, sizes_for  # noqa: E402
from trainer.device import place  # noqa: E402
from trainer.presets import PRESETS  # noqa: E402


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, even where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def gpu_cfg(tmp_path):
    return sizes_for(False, "cuda").config(str(tmp_path / "cache"), "offline")


# -- the refusal ---------------------------------------------------------------------------
def test_device_cuda_without_a_gpu_is_refused_before_any_work(no_gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quality, "run", lambda *a, **k: pytest.fail("the quality part started"))
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as refused:
        main(["quality", "--device", "cuda", "--out", str(out), "--docs", str(tmp_path / "b.md")])
    assert refused.value.code == 2
    assert "--device cuda: no CUDA GPU visible" in capsys.readouterr().err
    assert not out.exists()


def test_device_cuda_is_for_the_quality_part_only(capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["throughput", "--device", "cuda"])
    assert refused.value.code == 2 and "--device cuda: only the quality part" in capsys.readouterr().err


def test_device_cuda_is_taken_where_torch_sees_a_gpu(simulated_gpu):
    simulated_gpu("T4")
    assert parse_args(["quality", "--device", "cuda"]).device == "cuda"
    assert parse_args(["quality"]).device == "cpu"


def test_peak_memory_refuses_cuda_without_a_gpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "bench.peak_memory", "--loss", "--device", "cuda"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--device cuda: no CUDA GPU visible" in done.stderr


# -- what each contender is given ----------------------------------------------------------
def test_gpu_sizes_are_the_kaggle_t4_model_in_fp16(gpu_cfg):
    t4 = PRESETS["kaggle-t4"]
    assert (gpu_cfg.device, gpu_cfg.precision) == ("cuda", "fp16")
    for key in ("n_layer", "n_embd", "n_head", "block_size", "micro_batch"):
        assert getattr(gpu_cfg, key) == t4[key], key
    assert gpu_cfg.grad_accum == 1                  # the same tokens per step as the Sizes say
    # the offline corpus and BPE of bench.gpu, which .ci/gpu-check runs first with the same cache
    assert "dataset" not in t4 or gpu_cfg.dataset != t4["dataset"]
    assert (gpu_cfg.subset, gpu_cfg.vocab_size) == (GPU_PART.subset, GPU_PART.vocab_size)


def test_budgets_and_smoke_follow_the_device():
    assert sizes_for(False, "cuda", (0.2, 0.1)).budgets_min == (0.1, 0.2)
    smoke = sizes_for(True, "cuda")
    assert (smoke.device, smoke.precision, smoke.n_layer) == ("cuda", "fp16", SMOKE.n_layer)
    assert (sizes_for(False, "cpu").device, sizes_for(False, "cpu").precision) == ("cpu", "fp32")


def test_every_contender_keeps_cuda_and_fp16(gpu_cfg):
    specs = quality.contenders("llama")
    for name, (_, settings) in specs.items():
        cfg = gpu_cfg.replace(**settings)
        assert (cfg.device, cfg.precision) == ("cuda", "fp16"), name
    assert specs[quality.NEW][1] == {"optimizer": "muon", "arch": "llama"}


def test_the_plain_loop_gets_fp16(gpu_cfg, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(quality, "run_plain", lambda cfg, data, precision, *a, **k: seen.update(
        device=cfg.device, precision=precision))
    quality.run_plain_loop(gpu_cfg, None, tmp_path, Watch(None, None, [1.0], NO_EVAL, 1))
    assert seen == {"device": "cuda", "precision": "fp16"}


def test_the_hf_trainer_gets_its_fp16_mode_on_the_gpu_and_nothing_on_the_cpu(gpu_cfg, tmp_path):
    args = default_arguments(gpu_cfg, tmp_path)
    assert (args["fp16"], args["bf16"], args["use_cpu"]) == (True, False, False)
    cpu = default_arguments(sizes_for(False, "cpu").config(str(tmp_path), "offline"), tmp_path)
    assert (cpu["fp16"], cpu["bf16"], cpu["use_cpu"]) == (False, False, True)


@pytest.mark.parametrize("name", ["T4", "H100"])
def test_the_trainer_is_placed_in_fp16_even_where_bf16_is_native(simulated_gpu, gpu_cfg, name):
    simulated_gpu(name)
    placement = place(gpu_cfg)
    assert placement.device == torch.device("cuda", 0)
    assert placement.precision == "fp16" and placement.autocast_dtype == torch.float16
    assert placement.grad_scaler().is_enabled()


# -- the shared evaluation, the clocks and the memory ---------------------------------------
def test_the_evaluation_runs_under_the_given_autocast(tiny_data):
    entered = []

    class Recorded:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    from trainer.model import build_model
    cfg = SMOKE.config("/unused", "offline")
    model = build_model(cfg, tiny_data.vocab_size, tiny_data.tokenizer.eos_token_id)
    validation = Validation(tiny_data, SMOKE.block_size, SMOKE.micro_batch, 2, torch.device("cpu"), Recorded)
    assert math.isfinite(validation.bpb(model)) and len(entered) == 2     # once per validation batch


def test_interleaved_runs_sync_before_every_clock_reading(tmp_path):
    syncs = []

    def loop(cfg, data, out_dir, watch):
        for step in range(1, 100):
            watch.stamp(step)

    cfg = SMOKE.config(str(tmp_path), "offline")
    watches = quality.interleaved({"x": (loop, {}), "y": (loop, {})}, ["x", "y"], cfg, None, {"x": 3, "y": 2},
                                  lambda clock, last: Watch(clock, None, [math.inf], NO_EVAL, last),
                                  sync=lambda: syncs.append(1))
    assert sorted(watches["x"].clock.stamps) == [1, 2, 3] and len(syncs) == 3 + 2


def test_cuda_peak_synchronises_then_keeps_the_largest_allocation(simulated_gpu, monkeypatch):
    gpu = simulated_gpu("H100")
    allocated = iter([3 * 2 ** 20, 1 * 2 ** 20])     # a reset in between (the trainer's) lowers the reading
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(allocated))
    peak = CudaPeak()
    peak()
    peak()
    assert peak.mb == 3.0
    assert [name for name, _ in gpu.calls] == ["reset_peak_memory_stats", "synchronize", "synchronize"]


def test_a_gpu_seed_peak_becomes_a_row_and_a_cpu_run_has_none():
    rows = quality.memory_rows([{"before": [], "after": [], "peak_cuda_mb": 900.0}])
    assert [r["name"] for r in rows] == ["peak CUDA memory allocated in a seed, the four together"]
    assert rows[0]["values"] == [900.0] and quality.memory_rows([{"before": [], "after": []}]) == []


def test_the_loss_memory_on_a_gpu_is_measured_in_fp16_in_this_process(monkeypatch):
    from bench import peak_memory

    asked = []
    fake = [{"loss_chunk_tokens": c, "loss_peak_mb": 100.0 / (1 + c), "loss_rel_diff": 0.0 if not c else 2e-4,
             "grad_max_rel_diff": 0.0 if not c else 3e-3} for c in peak_memory.LOSS_CHUNKS]
    monkeypatch.setattr(peak_memory, "run_losses", lambda *args: asked.append(args) or fake)
    monkeypatch.setattr(peak_memory, "child", lambda cmd: pytest.fail("a child process on the GPU path"))
    rows, targets, notes = quality_figures.loss_memory(False, "cuda")
    assert asked == [("fp16", 3, "cuda")]
    assert rows[0]["name"] == "loss at kaggle-t4 size, full logits: peak CUDA memory allocated above its inputs"
    assert all(t["met"] for t in targets[1:])       # fp16's tolerances, not fp32's 1e-6
    assert "fp16 autocast on cuda:0" in notes[0]


# -- .ci/gpu-check -----------------------------------------------------------------------------
def test_gpu_check_runs_the_quality_step_and_reports_its_figures():
    script = (ROOT / ".ci" / "gpu-check").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu-check")], check=False).returncode == 0
    step = script.index("step bench_quality ")
    assert script.index("step bench_gpu ") < step
    command = script[step:script.index("\n", script.index("\\\n", step) + 2)]
    for part in ("python3 -m bench quality --device cuda", "--repeats 1", '--cache-dir "$OUT/bench-cache"',
                 '--out "$OUT/bench-quality.json"', '--docs "$OUT/bench-quality.md"'):
        assert part in command, part
    figures = script[script.index('echo "figures:"'):]
    assert '"$OUT/bench-quality.md"' in figures
