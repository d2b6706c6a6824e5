"""How tests/data/expdb_vN.db were made: this script, run by the expdb of schema version N.

    PYTHONPATH=. python tests/data/make_expdb_file.py tests/data/expdb_v4.db     # the current schema

It makes a database of whatever schema the expdb that runs it has (metrics without a
column in that schema are ignored, so the same script made every version). expdb_v1.db
was made at commit 33b5a9a (schema 1, the script then named make_expdb_v1.py), and
expdb_v2.db at commit dae620f (schema 2), expdb_v3.db at commit 1e058b2 (schema 3); to make
one again:

    git worktree add /tmp/expdb-v1 33b5a9a
    cd /tmp/expdb-v1 && PYTHONPATH=. python tests/data/make_expdb_v1.py tests/data/expdb_v1.db

When the schema changes, keep the old files and add one made by the new schema.

What it holds (tests/test_expdb_migrations.py relies on it): an Optuna study "v1-study"
with two trials whose user attribute "run_id" points to runs 1 and 2 of that study,
and run 3 outside any study that failed with NaN and infinite values; 30 steps per
run, evals, two epochs, checkpoints (one flagged deleted) and events. From version 3 the
epochs of runs 1 and 2 hold GPU utilisation, memory, temperature and power (as if trained
on a GPU); run 3's are NULL (a CPU run). From version 4 the evals and epochs of every run hold
val_bpb, the epochs of runs 1 and 2 mfu, and val_word_ppl is NaN (stored NULL) in run 3's
(a text without words).
"""
import math
import sqlite3
import sys
from pathlib import Path

import optuna

import expdb
from trainer.recorder import RunInfo


def info(name, **kw):
    return RunInfo(name=name, config={"out_dir": f"runs/{name}", "lr": kw.pop("lr", 1e-3), "n_layer": 2},
                   dataset={"source": "stdlib"}, tokenizer={"kind": "bpe", "vocab_size": 512},
                   n_params=1000, device="cpu", precision="fp32", host="v1host", **kw)


# An epoch's GPU columns (schema 3), as trainer.gpu_monitor.gpu_epoch_metrics gives them, and its
# model-FLOPs utilisation (schema 4).
GPU_EPOCH = {"gpu_util_pct": 87.5, "gpu_util_max_pct": 100.0, "gpu_mem_used_mb": 14_000.0, "gpu_temp_c": 71.0,
             "gpu_power_w": 65.0, "mfu": 0.25}
BYTES_PER_TOKEN = 4.0       # schema 4: bpb = loss / BYTES_PER_TOKEN / ln 2


def text_metrics(val_loss, words):
    """val_bpb and val_word_ppl (schema 4) of an evaluation: 3 tokens per word, or no words."""
    return {"val_bpb": val_loss / BYTES_PER_TOKEN / math.log(2),
            "val_word_ppl": math.exp(val_loss * 3) if words else math.nan}


def record(db, run_info, final_loss, status="completed"):
    rec = db.recorder()
    run_id = rec.start_run(run_info)
    for step in range(1, 31):
        loss = final_loss + (30 - step) / 10
        rec.log_step(step, {"loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
                            "epoch": (step - 1) // 15, "tokens_seen": 256 * step})
        if step % 10 == 0:
            text = text_metrics(loss + 0.1, words=status == "completed")
            rec.log_eval(step, (step - 1) // 15, {"val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1), **text})
        if step % 15 == 0:
            gpu = GPU_EPOCH if status == "completed" else {}
            text = text_metrics(loss + 0.1, words=status == "completed")
            rec.log_epoch(step // 15 - 1, {"train_loss": loss, "val_loss": loss + 0.1, "step": step, **gpu, **text})
            rec.log_checkpoint(f"runs/{run_info.name}/step-{step:07d}", "periodic", step, loss + 0.1,
                               4096, f"{run_id:02d}{step:02d}" * 16)
    rec.log_event("checkpoint_deleted", 30, {"path": f"runs/{run_info.name}/step-0000015"})
    if status == "failed":
        rec.log_step(31, {"loss": math.nan, "grad_norm": math.inf, "lr": -math.inf})
        rec.log_event("nonfinite", 31, {"loss": "nan"})
    rec.finish(status, "done" if status == "completed" else "nonfinite loss")
    return run_id


def main(path: Path) -> None:
    url = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="v1-study", direction="minimize")
    with expdb.open(path) as db:
        for number, lr in enumerate((1e-3, 3e-3)):
            trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
            run_id = record(db, info(f"v1-study/trial-{number}", lr=trial.params["lr"], study_name="v1-study",
                                     trial_number=trial.number), final_loss=2.0 - number / 2)
            trial.set_user_attr("run_id", run_id)
            trial.report(2.0, 10)
            study.tell(trial, 2.1 - number / 2)
        record(db, info("lonely"), final_loss=3.0, status="failed")
    storage.engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")     # one self-contained file
    conn.execute("VACUUM")
    conn.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
