"""One run row per training, whatever happened to it (issue 28): a resume continues the row its
checkpoint names by uid, from a moved folder or in another database; a start in a folder whose run
was killed before its first checkpoint takes that row over."""
import json
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import expdb
from expdb.merge import merge
from trainer.run import train


def run(cfg, data, db, out, **kw):
    return train(cfg.replace(out_dir=str(out)), db.recorder(), data=data, log=lambda *_: None, **kw)


def steps(db, run_id):
    return list(db.steps(run_id).step)


def test_a_resume_from_a_moved_folder_continues_the_runs_row(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(max_steps=20, save_every=10, eval_every=10, log_every=1)
    db = expdb.open(tmp_path / "experiments.db")
    first = run(cfg, tiny_data, db, tmp_path / "kaggle-session-1")
    moved = tmp_path / "renamed-elsewhere"
    shutil.copytree(tmp_path / "kaggle-session-1", moved)       # another name: the run's name differs too
    resumed = run(cfg, tiny_data, expdb.open(tmp_path / "experiments.db"), moved,
                  resume=str(moved / "checkpoints" / "step-0000010"))
    db = expdb.open(tmp_path / "experiments.db")
    assert resumed.run_id == first.run_id and len(db.runs()) == 1
    assert db.run(first.run_id).status == "completed"
    assert steps(db, first.run_id) == list(range(1, 21))         # steps 11-20 replaced, none twice
    events = db.events(first.run_id)
    assert [d["resume_step"] for d in events[events.kind == "resume"].detail] == [10]


def test_a_resume_in_another_database_whose_ids_differ_continues_the_merged_row(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(max_steps=20, save_every=10, eval_every=10, log_every=1)
    first_db = expdb.open(tmp_path / "session-1.db")
    first = run(cfg.replace(max_steps=10), tiny_data, first_db, tmp_path / "a")      # stopped at step 10
    other = expdb.open(tmp_path / "session-2.db")
    for name in ("x", "y"):                                    # that database's ids 1 and 2 are taken
        run(cfg.replace(max_steps=2), tiny_data, other, tmp_path / name)
    merge([tmp_path / "session-1.db"], tmp_path / "session-2.db")
    other = expdb.open(tmp_path / "session-2.db")
    merged = [r for r in other.runs().itertuples() if r.name == "a"]
    assert len(merged) == 1 and merged[0].id != first.run_id
    resumed = run(cfg, tiny_data, other, tmp_path / "a", resume="auto")
    other = expdb.open(tmp_path / "session-2.db")
    assert resumed.run_id == merged[0].id and len(other.runs()) == 3
    assert steps(other, resumed.run_id) == list(range(1, 21))


def _ended() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_start_where_a_run_was_killed_before_its_first_checkpoint_takes_its_row_over(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(max_steps=12, log_every=1)
    out = tmp_path / "run"
    db = expdb.open(tmp_path / "experiments.db")
    # What a SIGKILL before the first checkpoint leaves: the row running with its first steps, and
    # the folder's run.json saying running for a process that has gone.
    killed = run(cfg.replace(max_steps=3, save_every=0, epochs=1), tiny_data, db, out)
    record = json.loads((out / "run.json").read_text())
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "final_model", ignore_errors=True)
    with sqlite3.connect(tmp_path / "experiments.db") as conn:
        conn.execute("UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?", (killed.run_id,))
    (out / "run.json").write_text(json.dumps({**record, "status": "running", "pid": _ended(),
                                              "host": socket.gethostname()}))
    again = run(cfg, tiny_data, expdb.open(tmp_path / "experiments.db"), out)
    db = expdb.open(tmp_path / "experiments.db")
    assert again.run_id == killed.run_id and len(db.runs()) == 1
    assert db.run(again.run_id).status == "completed"
    assert steps(db, again.run_id) == list(range(1, 13))        # its 3 steps replaced, not repeated
    events = db.events(again.run_id)
    assert [d["resume_step"] for d in events[events.kind == "resume"].detail] == [0]


def test_a_running_process_s_row_is_not_taken_over(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(max_steps=3, log_every=1)
    out = tmp_path / "run"
    db = expdb.open(tmp_path / "experiments.db")
    first = run(cfg, tiny_data, db, out)
    record = json.loads((out / "run.json").read_text())
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "final_model")
    # another process still trains in this folder (the test's own process stands for it)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        (out / "run.json").write_text(json.dumps({**record, "status": "running", "pid": alive.pid}))
        second = run(cfg, tiny_data, expdb.open(tmp_path / "experiments.db"), out)
    finally:
        alive.kill()
    assert second.run_id != first.run_id        # its row is left to it; this start is a run of its own
    assert expdb.open(tmp_path / "experiments.db").run(first.run_id).status == "completed"
