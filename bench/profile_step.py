"""python -m bench.profile_step: torch.profiler over optimizer steps of the trainer (bench throughput's model: 4 x 128, context 128, micro 16)."""
import time
from torch.profiler import ProfilerActivity, profile

from trainer.config import TrainConfig
from trainer.data import prepare_data
from trainer.run import train
from trainer.recorder import NullRecorder

cfg = TrainConfig(subset=0.3, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, block_size=128, micro_batch=16,
                  grad_accum=1, max_steps=12, eval_every=1000, save_every=0, precision="fp32", progress=False,
                  cache_dir=".cache/bench", out_dir="/tmp/prof-run", warmup_steps=3)
data = prepare_data(cfg, log=lambda *_: None)
train(cfg.replace(max_steps=3, out_dir="/tmp/prof-warm"), NullRecorder(), data=data, log=lambda *_: None)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    train(cfg, NullRecorder(), data=data, log=lambda *_: None)
    wall = time.perf_counter() - t
print(f"12 steps in {wall:.2f} s ({wall / 12 * 1000:.0f} ms a step incl. setup and final save)")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
