"""Out-of-memory recognition and fault injection, without a GPU."""
import pytest
import torch

from trainer.memory import FaultInjector, is_out_of_memory, largest_micro_batch, memory_report


def test_out_of_memory_is_recognised_by_type_then_by_message():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator error


def forward(model):
    return model(input_ids=torch.zeros((1, 4), dtype=torch.long)).logits


def test_injected_faults_fire_once_at_their_steps_from_inside_the_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    ran = []
    model.transformer.h[0].register_forward_hook(lambda *_: ran.append("block 0"))
    inject = FaultInjector.from_env({"TRAINER_INJECT_OOM": "2, 5", "TRAINER_INJECT_NAN": "3"})
    with inject.oom_inside(model, 1):
        forward(model)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="step 2"), inject.oom_inside(model, 2):
        forward(model)
    assert ran == ["block 0", "block 0"]      # it failed inside the model, after the earlier blocks ran
    with inject.oom_inside(model, 2):         # the redone step succeeds, and the hook is gone
        forward(model)
    assert not model.transformer.h[-1]._forward_hooks
    loss = torch.tensor(1.5)
    assert torch.isnan(inject.corrupt_loss(3, loss)) and inject.corrupt_loss(4, loss) == loss
    inject.after_step(3)
    assert inject.corrupt_loss(3, loss) == loss


def test_an_injected_backward_fault_fires_in_the_backward_pass_not_the_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    inject = FaultInjector.from_env({"TRAINER_INJECT_OOM_BACKWARD": "2"})
    with inject.oom_inside(model, 2):
        logits = forward(model)                   # the forward pass completes
    with pytest.raises(torch.cuda.OutOfMemoryError, match="TRAINER_INJECT_OOM_BACKWARD at step 2"):
        logits.sum().backward()
    with inject.oom_inside(model, 2):             # once only
        forward(model).sum().backward()


def test_an_injection_for_one_rank_fires_on_that_rank_only():
    setting = {"TRAINER_INJECT_OOM": "3@1,5", "TRAINER_INJECT_NAN": "4@0"}
    assert FaultInjector.from_env({**setting, "RANK": "1"}) == FaultInjector({3, 5}, set())
    assert FaultInjector.from_env({**setting, "RANK": "0"}) == FaultInjector({5}, {4})
    assert FaultInjector.from_env(setting) == FaultInjector({5}, {4})       # one process is rank 0


@pytest.mark.parametrize("value", ["3;7", "3@", "x@1", "3@1@2"])
def test_a_malformed_injection_setting_names_the_variable(value):
    with pytest.raises(ValueError, match=f"TRAINER_INJECT_OOM='{value}': expected optimizer step numbers"):
        FaultInjector.from_env({"TRAINER_INJECT_OOM": value})


def test_micro_batch_search_on_the_cpu_keeps_the_configured_micro_batch():
    tried = []
    assert largest_micro_batch(tried.append, 64, torch.device("cpu"), current=8) == 8
    assert tried == []  # nothing to probe without GPU memory


def test_memory_report_names_process_and_system_memory():
    line = memory_report(torch.device("cpu"))
    assert line.startswith("memory: process ") and "system available" in line
