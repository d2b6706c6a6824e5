"""A finished run gives its memory back before the next trial of the same process starts.

The Hugging Face Trainer's hyperparameter search leaked GPU memory from trial to trial for
years (transformers#13019, #31923): something kept the last model alive. Here, after a run or
a study's trial, no tensor it made may stay alive; on a GPU the allocated memory returns to its
level before the run (that half runs where CUDA is present, as in .ci/gpu-check).
"""
import gc

import pytest
import torch

import expdb
from trainer.run import train


def live_tensors() -> dict[int, torch.Tensor]:
    gc.collect()
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def left_behind(before: dict[int, torch.Tensor]) -> list[str]:
    """What was made since ``before`` and is still alive: shape and dtype of each tensor."""
    return [f"{tuple(t.shape)} {t.dtype}" for i, t in live_tensors().items() if i not in before]


def run_once(cfg, data, tmp_path, name):
    db = expdb.open(tmp_path / f"{name}.db")
    result = train(cfg.replace(out_dir=str(tmp_path / name)), db.recorder(), data=data, log=lambda *_: None)
    db.close()
    return result


def test_a_finished_run_leaves_no_tensor_alive(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(max_steps=6, save_every=3)        # checkpoints: their host buffers too
    run_once(cfg, tiny_data, tmp_path, "warm-up")            # imports and one-time caches
    before = live_tensors()
    assert run_once(cfg, tiny_data, tmp_path, "run").status == "completed"
    assert left_behind(before) == []


def test_a_run_that_ended_by_an_out_of_memory_fault_leaves_no_tensor_alive(tiny_cfg, tiny_data, tmp_path,
                                                                            monkeypatch):
    # a failed run's exception (and its traceback's frames) must not hold the model either
    cfg = tiny_cfg.replace(max_steps=6, micro_batch=1, grad_accum=4, gradient_checkpointing="false")
    run_once(cfg, tiny_data, tmp_path, "warm-up")
    before = live_tensors()
    monkeypatch.setenv("TRAINER_INJECT_OOM", "2")
    assert run_once(cfg, tiny_data, tmp_path, "oom").status == "failed"
    assert left_behind(before) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the CPU half is the tests above")
def test_a_finished_run_gives_its_gpu_memory_back(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(device="cuda", max_steps=6, save_every=3)
    run_once(cfg, tiny_data, tmp_path, "warm-up")
    gc.collect()
    before = torch.cuda.memory_allocated()
    run_once(cfg, tiny_data, tmp_path, "run")
    gc.collect()
    assert torch.cuda.memory_allocated() == before
