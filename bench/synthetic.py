"""Synthetic runs written through expdb's recorder, for tests, benchmarks and demonstrations.

    python -m bench.synthetic --db long.db --steps 1000000 [--resume-at 400000]
    python -m dashboards --db long.db --run 1 --out long.png

The run looks like training: a decaying noisy loss with a few spikes, warmup then cosine
learning rate, a gradient norm with blow-ups, an evaluation every ``eval_every`` steps, one
epoch row per ``steps_per_epoch``, an out-of-memory event, a best checkpoint, and optionally a
resume (the first session stops at ``resume_at + 1000`` and a second one replays from
``resume_at``, as a crashed run resumed from its checkpoint would).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

import numpy as np

from trainer.metrics import perplexity

CONFIG = dict(n_layer=8, n_embd=256, n_head=8, block_size=512, lr=5e-4, micro_batch=8,
              grad_accum=8, grad_clip=1.0, precision="fp16", warmup_steps=500)


def curves(n_steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """loss, lr and grad_norm for steps 1..n_steps."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, n_steps + 1, dtype=float)
    t = step / n_steps
    loss = 2.5 + 6.0 * np.exp(-8 * t) + rng.normal(0, 0.08, n_steps)
    grad = 0.4 + 0.6 * np.exp(-5 * t) + np.abs(rng.normal(0, 0.05, n_steps))
    spikes = rng.choice(n_steps, size=max(1, n_steps // 200_000 + 2), replace=False)
    loss[spikes] += 4.0
    grad[spikes] *= 40.0
    warm = min(500, max(1, n_steps // 100))
    lr = np.where(step < warm, 5e-4 * step / warm,
                  5e-5 + 4.5e-4 * 0.5 * (1 + np.cos(math.pi * np.clip((step - warm) / n_steps, 0, 1))))
    return dict(step=step.astype(int), loss=loss, lr=lr, grad_norm=grad)


def write_synthetic_run(db: Any, n_steps: int, *, name: str = "synthetic", eval_every: int = 0,
                        steps_per_epoch: int = 0, resume_at: int | None = None,
                        gpu: bool = True, status: str = "completed", seed: int = 0,
                        study_name: str | None = None, trial_number: int | None = None) -> int:
    """Write one run of ``n_steps`` steps into the open expdb database ``db``; return its id."""
    eval_every = eval_every or max(1, n_steps // 50)
    steps_per_epoch = steps_per_epoch or max(1, n_steps // 4)
    c = curves(n_steps, seed)
    run_id = None
    sessions = [(1, n_steps)] if resume_at is None else [(1, min(n_steps, resume_at + 1000)),
                                                          (resume_at + 1, n_steps)]
    for i, (first, last) in enumerate(sessions):
        extra = {} if i == 0 else {"run_id": run_id, "resume_step": resume_at}
        rec = db.recorder(study_name=study_name, trial_number=trial_number, batch_rows=20_000,
                          flush_interval_s=5.0)
        run_id = rec.start_run(_info(name, extra))
        _log_session(rec, c, first, last, eval_every, steps_per_epoch, gpu)
        rec.finish(status if last == n_steps else "interrupted",
                   None if last == n_steps else "synthetic crash")
    return run_id


def _info(name: str, extra: dict[str, Any]) -> Any:
    from trainer.recorder import RunInfo

    return RunInfo(name=name, config=dict(CONFIG), dataset={"source": "synthetic"},
                   tokenizer={"kind": "bpe"}, n_params=25_000_000, device="cuda:0 (synthetic)",
                   precision="fp16", host="synthetic", extra=extra)


def _log_session(rec: Any, c: dict[str, np.ndarray], first: int, last: int, eval_every: int,
                 steps_per_epoch: int, gpu: bool) -> None:
    loss, lr, grad = c["loss"].tolist(), c["lr"].tolist(), c["grad_norm"].tolist()
    best = math.inf
    for step in range(first, last + 1):
        i, epoch = step - 1, (step - 1) // steps_per_epoch
        rec.log_step(step, dict(loss=loss[i], lr=lr[i], grad_norm=grad[i], epoch=epoch,
                                tokens_per_s=50_000.0, tokens_seen=step * 32_768))
        if step == max(2, last // 3) and first == 1:
            rec.log_event("oom", step, {"micro_batch": 16, "retry_micro_batch": 8})
        if step % eval_every == 0 or step == last:
            val = 0.1 + float(np.mean(loss[max(0, i - eval_every + 1): i + 1]))
            rec.log_eval(step, epoch, dict(val_loss=val, val_ppl=perplexity(val)))
            if val < best:
                best = val
                rec.log_checkpoint("best", "best", step, val, 100_000_000, "0" * 64)
        if step % steps_per_epoch == 0 or step == last:
            rec.log_epoch(epoch, _epoch_metrics(c, step, steps_per_epoch, gpu))


def _epoch_metrics(c: dict[str, np.ndarray], step: int, steps_per_epoch: int, gpu: bool
                   ) -> dict[str, float]:
    lo = max(0, step - steps_per_epoch)
    metrics = dict(step=step, train_loss=float(c["loss"][lo:step].mean()),
                   lr=float(c["lr"][step - 1]), epoch_seconds=3600.0 + 50 * (step // steps_per_epoch),
                   tokens_per_s=50_000.0, mem_process_mb=3100.0)
    if gpu:
        metrics.update(mem_gpu_allocated_mb=6100.0, mem_gpu_reserved_mb=9800.0,
                       mem_gpu_peak_mb=11900.0)
    return metrics


def write_study(db: Any, study_name: str, n_trials: int = 6, *, storage: str | None = None,
                pruned: Sequence[int] = (2, 4), n_steps: int = 40, eval_every: int = 10,
                seed: int = 0) -> Any:
    """A small Optuna study whose trials are recorded runs (no model is trained).

    Each trial asks for lr (log), n_layer (int) and micro_batch (categorical), records a run
    of ``n_steps`` steps through ``db.recorder`` and reports each evaluation to Optuna; the
    trials in ``pruned`` stop at their second evaluation as pruned. The study lives in
    ``storage`` (default: the database's own URL). Returns the Optuna study.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage or db.url,
                                direction="minimize", load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n_trials):
        trial = study.ask()
        params = dict(lr=trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                      n_layer=trial.suggest_int("n_layer", 1, 4),
                      micro_batch=trial.suggest_categorical("micro_batch", [8, 16]))
        stop = 2 * eval_every if trial.number in pruned else n_steps
        rec = db.recorder(study_name=study_name, trial_number=trial.number)
        run_id = rec.start_run(_trial_info(study_name, trial.number, params))
        trial.set_user_attr("run_id", run_id)
        value = _trial_session(rec, trial, params, stop, eval_every)
        state = "pruned" if stop < n_steps else "completed"
        rec.finish(state, "pruned at step %d" % stop if state == "pruned" else None)
        study.tell(trial, value if state == "completed" else None,
                   state=optuna.trial.TrialState.COMPLETE if state == "completed"
                   else optuna.trial.TrialState.PRUNED)
    return study


def _trial_info(study_name: str, number: int, params: dict[str, Any]) -> Any:
    from trainer.recorder import RunInfo

    config = {**CONFIG, **params, "out_dir": f"runs/{study_name}/trial-{number:04d}"}
    return RunInfo(name=f"{study_name}/trial-{number}", config=config, dataset={}, tokenizer={},
                   n_params=1000 * params["n_layer"], device="cpu", precision="fp32", host="test",
                   study_name=study_name, trial_number=number)


def _trial_session(rec: Any, trial: Any, params: dict[str, Any], stop: int, eval_every: int
                   ) -> float:
    """Log steps 1..stop; a lower lr distance from 3e-3 and more layers give a lower loss."""
    floor = 2.0 + abs(math.log10(params["lr"] / 3e-3)) + 0.2 / params["n_layer"]
    best = math.inf
    for step in range(1, stop + 1):
        loss = floor + 4.0 * math.exp(-step / 15)
        rec.log_step(step, dict(loss=loss, lr=params["lr"], grad_norm=1.0 / step ** 0.5, epoch=0))
        if step % eval_every == 0:
            val = loss + 0.1
            rec.log_eval(step, 0, dict(val_loss=val, val_ppl=perplexity(val)))
            trial.report(val, step)
            best = min(best, val)
    rec.log_epoch(0, dict(step=stop, train_loss=floor + 1, val_loss=best, epoch_seconds=1.0,
                          mem_process_mb=300.0))
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="Experiment database to write into (created).")
    p.add_argument("--steps", type=int, default=100_000, help="Optimizer steps (default 100000).")
    p.add_argument("--resume-at", type=int, default=None, metavar="STEP",
                   help="Crash after STEP+1000 steps and resume from STEP.")
    p.add_argument("--cpu", action="store_true", help="Record process memory instead of GPU memory.")
    args = p.parse_args(argv)
    if args.steps < 1 or (args.resume_at is not None and not 0 < args.resume_at < args.steps):
        print(f"error: --steps {args.steps} --resume-at {args.resume_at}: use --steps >= 1 and "
              "0 < --resume-at < --steps", file=sys.stderr)
        return 2
    import expdb

    with expdb.open(args.db) as db:
        run_id = write_synthetic_run(db, args.steps, resume_at=args.resume_at, gpu=not args.cpu,
                                     name=f"synthetic-{args.steps}")
    print(f"wrote run {run_id} ({args.steps} steps) to {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
