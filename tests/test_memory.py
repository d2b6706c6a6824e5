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


# -- on a simulated GPU (tests/simulated_gpu.py: torch's answers, no GPU runs) --------------------
GIB = 1024 ** 3


def test_freeing_memory_empties_the_cache_only_when_no_other_gpu_of_the_process_holds_memory(simulated_gpu,
                                                                                             monkeypatch):
    from trainer.memory import clear_cache_if_due, free_memory

    gpu = simulated_gpu("T4 x2")
    reserved = {0: 0, 1: 3 * GIB}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved[gpu.index_of(device)])
    mine = torch.device("cuda", 1)
    free_memory(mine)                        # this run alone holds GPU memory here
    assert len(gpu.calls_named("empty_cache")) == 1
    reserved[0] = 2 * GIB                    # a study's other trial, on cuda:0
    free_memory(mine)
    clear_cache_if_due(10, 5, mine)
    assert len(gpu.calls_named("empty_cache")) == 1     # empty_cache would empty cuda:0's cache too


def simulated_allocator(monkeypatch, gpu, allocated: int):
    """memory_allocated stays ``allocated``; the peak is what a pass sets, until reset."""
    peak = {"bytes": allocated}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(bytes=allocated))
    return peak


def test_micro_batch_auto_fits_what_the_gpu_has_free_less_adamw_state_not_its_total(simulated_gpu, monkeypatch):
    from trainer.memory import largest_micro_batch

    gpu = simulated_gpu("T4")                 # 14.7 GiB
    weights = 1 * GIB
    gpu.memory_used = 6 * GIB + weights       # another worker on this GPU and the CUDA context, and ours
    peak = simulated_allocator(monkeypatch, gpu, weights)
    tried = []

    def try_batch(n):                         # half a GiB of activations a sequence
        tried.append(n)
        peak["bytes"] = weights + n * GIB // 2

    n = largest_micro_batch(try_batch, 32, torch.device("cuda", 0), current=4, later_bytes=2 * GIB)
    # free for this run: 14.7 - 7 = 7.7 GiB; 0.9 x 7.7 - 2 (AdamW's moments, still to come) = 5.0 GiB;
    # against 0.9 x the card's 14.7 GiB it would take 16, and fail at the first step
    assert (n, tried) == (8, [32, 16, 8])


def test_two_workers_probing_one_gpu_take_turns(simulated_gpu, monkeypatch):
    import threading

    from trainer.memory import largest_micro_batch

    gpu = simulated_gpu("T4")
    simulated_allocator(monkeypatch, gpu, 0)
    inside, overlapped = threading.Semaphore(0), []

    def try_batch(n):
        inside.release()
        # the other worker's probe, had it started, would be in its pass now (it resets the peak counter)
        overlapped.append(inside.acquire(timeout=0.5) and inside.acquire(timeout=0.5))

    workers = [threading.Thread(target=largest_micro_batch, args=(try_batch, 1, torch.device("cuda", 0), 1))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert overlapped == [False, False]


def test_the_epoch_gpu_peak_is_each_epochs_own(simulated_gpu, monkeypatch):
    from trainer.memory import epoch_memory

    gpu = simulated_gpu("T4")
    peak = simulated_allocator(monkeypatch, gpu, GIB)
    peak["bytes"] = 5 * GIB                   # epoch 0 peaks at 5 GiB
    assert epoch_memory(torch.device("cuda", 0))["mem_gpu_peak_mb"] == 5 * 1024
    peak["bytes"] = max(peak["bytes"], 3 * GIB)    # epoch 1 at 3 GiB
    assert epoch_memory(torch.device("cuda", 0))["mem_gpu_peak_mb"] == 3 * 1024
    assert epoch_memory(torch.device("cpu"))["mem_gpu_peak_mb"] is None


def test_the_optimizer_state_counted_ahead_is_what_adamw_allocates():
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.memory import optimizer_state_bytes

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    expected = optimizer_state_bytes(model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.zeros((1, 4), dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    made = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert expected == made
