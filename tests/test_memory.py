"""Out-of-memory recognition and fault injection, without a GPU."""
import pytest
import torch

from trainer.memory import FaultInjector, is_out_of_memory, largest_micro_batch, memory_report


def test_out_of_memory_is_recognised_by_type_then_by_message():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator error


def test_injected_faults_fire_once_at_their_steps():
    inject = FaultInjector.from_env({"TRAINER_INJECT_OOM": "2, 5", "TRAINER_INJECT_NAN": "3"})
    inject.before_forward(1)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="step 2"):
        inject.before_forward(2)
    inject.before_forward(2)  # the redone step succeeds
    loss = torch.tensor(1.5)
    assert torch.isnan(inject.corrupt_loss(3, loss)) and inject.corrupt_loss(4, loss) == loss
    inject.after_step(3)
    assert inject.corrupt_loss(3, loss) == loss


def test_a_malformed_injection_setting_names_the_variable():
    with pytest.raises(ValueError, match="TRAINER_INJECT_OOM='3;7'"):
        FaultInjector.from_env({"TRAINER_INJECT_OOM": "3;7"})


def test_micro_batch_search_on_the_cpu_keeps_the_configured_micro_batch():
    tried = []
    assert largest_micro_batch(tried.append, 64, torch.device("cpu"), current=8) == 8
    assert tried == []  # nothing to probe without GPU memory


def test_memory_report_names_process_and_system_memory():
    line = memory_report(torch.device("cpu"))
    assert line.startswith("memory: process ") and "system available" in line
