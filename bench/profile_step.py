"""python -m bench.profile_step: torch.profiler over optimizer steps of the trainer.

The throughput part's model (4 layers x 128, context 128, micro-batch 16, fp32, no database),
3 steps to warm up, then 12 profiled steps; prints the operators by self CPU time, so the
share of the optimizer, the loss and per-step Python work can be read off one table.
"""
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from trainer.config import TrainConfig
from trainer.data import prepare_data
from trainer.recorder import NullRecorder
from trainer.run import train

STEPS = 12


def main() -> None:
    work = tempfile.mkdtemp(prefix="bench-profile-")
    cfg = TrainConfig(subset=0.3, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, block_size=128,
                      micro_batch=16, grad_accum=1, max_steps=STEPS, eval_every=1000, save_every=0,
                      precision="fp32", progress=False, cache_dir=".cache/bench", out_dir=f"{work}/run",
                      warmup_steps=3)
    data = prepare_data(cfg, log=lambda *_: None)
    train(cfg.replace(max_steps=3, out_dir=f"{work}/warm-up"), NullRecorder(), data=data, log=lambda *_: None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        train(cfg, NullRecorder(), data=data, log=lambda *_: None)
        wall = time.perf_counter() - started
    print(f"{STEPS} steps in {wall:.2f} s ({wall / STEPS * 1000:.0f} ms a step, set-up and final save included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
