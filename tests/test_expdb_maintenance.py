"""``check`` and ``gc`` on checkpoint directories in the trainer's format: files plus a
manifest.json of their sha256, whose own sha256 is what the run recorded. (Checkpoints
written by the trainer itself are checked in test_expdb_concurrency's training run.)"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import NamedTuple

import pytest

import expdb
from expdb import maintenance
from expdb.__main__ import main
from test_expdb import make_info


class Saved(NamedTuple):
    path: Path
    size_bytes: int
    sha256: str


def write_checkpoint(path: Path, step: int) -> Saved:
    path.mkdir(parents=True)
    files = {"model.safetensors": os.urandom(2048), "trainer_state.json": json.dumps({"step": step}).encode()}
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {"files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    size = sum(len(d) for d in files.values()) + (path / "manifest.json").stat().st_size
    return Saved(path, size, hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest())


@pytest.fixture
def run_with_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """A run with three checkpoints, the first rotated away the way the trainer does it."""
    db_path, ckpts = tmp_path / "experiments.db", tmp_path / "run" / "checkpoints"
    with expdb.open(db_path) as db:
        rec = db.recorder()
        rec.start_run(make_info())
        for step in (10, 20, 30):
            saved = write_checkpoint(ckpts / f"step-{step:07d}", step)
            rec.log_checkpoint(str(saved.path), "periodic", step, 1.0, saved.size_bytes, saved.sha256)
        shutil.rmtree(ckpts / "step-0000010")
        rec.log_event("checkpoint_deleted", 30, {"path": str(ckpts / "step-0000010")})
        rec.finish("completed")
    return db_path, ckpts


def test_check_passes_a_sound_database(run_with_checkpoints):
    db_path, _ = run_with_checkpoints
    with expdb.open(db_path) as db:
        report = maintenance.check(db)
    assert report.ok and report.checkpoints_ok == 2 and report.problems == []


def test_check_finds_damaged_missing_and_unflagged_checkpoints(run_with_checkpoints):
    db_path, ckpts = run_with_checkpoints
    manifest = ckpts / "step-0000020" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", "{ ", 1))     # one byte more
    shutil.rmtree(ckpts / "step-0000030")                                 # gone, but not flagged
    with expdb.open(db_path) as db:
        report = maintenance.check(db)
    assert not report.ok and len(report.problems) == 2
    assert "step-0000020" in report.problems[0] and "does not match its recorded sha256" in report.problems[0]
    assert "step-0000030" in report.problems[1] and "missing" in report.problems[1]


def test_check_finds_rows_changed_behind_expdb_and_repairs_rollups(run_with_checkpoints):
    db_path, _ = run_with_checkpoints
    with expdb.open(db_path) as db:
        rec = db.recorder()
        run_id = rec.start_run(make_info("steps"))
        for step in range(200):
            rec.log_step(step, {"loss": 1.0})
        rec.finish("completed")
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM step_metrics WHERE step > 150")
    conn.commit()
    conn.close()
    assert main(["--db", str(db_path), "check", "--no-files"]) == 1
    with expdb.open(db_path) as db:
        assert "step_rollups count 200 steps but step_metrics holds 151" in maintenance.check(db).problems[0]
    assert main(["--db", str(db_path), "check", "--repair"]) == 0
    with expdb.open(db_path) as db:
        assert db.runs().set_index("id").loc[run_id, "n_steps"] == 151


def test_check_of_a_damaged_file_reports_integrity(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "experiments.db"
    with expdb.open(path) as db:
        rec = db.recorder()
        rec.start_run(make_info())
        for step in range(5000):
            rec.log_step(step, {"loss": 1.0, "lr": 0.1})
        rec.finish("completed")
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'step_metrics'").fetchone()[0]
    conn.close()
    with open(path, "r+b") as fh:           # the b-tree page type of step_metrics' root: invalid
        fh.seek((root - 1) * page_size)
        fh.write(b"\x00")
    assert main(["--db", str(path), "check", "--no-files"]) == 1
    out = capsys.readouterr().out
    assert "problem: integrity_check" in out and "salvage" in out


def test_gc_removes_rows_and_files_of_rotated_checkpoints(run_with_checkpoints, capsys: pytest.CaptureFixture):
    db_path, ckpts = run_with_checkpoints
    shutil.copytree(ckpts / "step-0000020", ckpts / "step-0000010")       # as if the delete had failed
    with expdb.open(db_path) as db:
        db.mark_checkpoint_deleted(1, str(ckpts / "step-0000020"))
    assert main(["--db", str(db_path), "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {ckpts / 'step-0000010'}" in out and "would remove 2 checkpoint rows and 2 files" in out
    assert (ckpts / "step-0000010").exists()
    with expdb.open(db_path) as db:
        assert len(db.checkpoints()) == 3                                  # the dry run changed nothing
    assert main(["--db", str(db_path), "gc"]) == 0
    assert "removed 2 checkpoint rows and 2 files" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000030"]
    with expdb.open(db_path) as db:
        assert db.checkpoints()["step"].tolist() == [30]
        assert maintenance.check(db).ok
    assert main(["--db", str(db_path), "gc"]) == 0
    assert "removed 0 checkpoint rows" in capsys.readouterr().out


def test_gc_leaves_alone_what_is_not_a_checkpoint(tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with expdb.open(tmp_path / "experiments.db") as db:
        rec = db.recorder()
        rec.start_run(make_info())
        rec.log_checkpoint(str(precious), "periodic", 1, None, 0, "0" * 64)
        rec.log_event("checkpoint_deleted", 1, {"path": str(precious)})
        rec.finish("completed")
        report = maintenance.gc(db)
        assert report.rows == [] and "not a checkpoint directory" in report.kept[0]
        assert len(db.checkpoints()) == 1
    assert (precious / "notes.txt").read_text() == "keep me"


def test_relative_paths_are_taken_from_root(tmp_path: Path):
    saved = write_checkpoint(tmp_path / "out" / "ck", 1)
    with expdb.open(tmp_path / "experiments.db") as db:
        rec = db.recorder()
        rec.start_run(make_info())
        rec.log_checkpoint(str(tmp_path / "out" / "ck"), "final", 1, None, saved.size_bytes, saved.sha256)
        rec.finish("completed")
        assert list(db.checkpoints().path) == ["out/ck"]   # inside the database's folder: stored relative
        assert maintenance.check(db, root=tmp_path).checkpoints_ok == 1
        assert maintenance.check(db).checkpoints_ok == 1    # by default from the database's folder
        assert "missing" in maintenance.check(db, root=tmp_path / "elsewhere").problems[0]


def test_a_moved_folder_still_passes_check_and_old_absolute_paths_keep_working(tmp_path: Path):
    """Paths inside the database's folder are stored relative to it and resolved on read."""
    first, outside = tmp_path / "first", tmp_path / "outside"
    saved = write_checkpoint(first / "runs" / "r" / "checkpoints" / "step-1", 1)
    kept = write_checkpoint(outside / "ck", 2)
    with expdb.open(first / "experiments.db") as db:
        rec = db.recorder()
        run_id = rec.start_run(make_info())
        rec.log_checkpoint(str(first / "runs/r/checkpoints/step-1"), "periodic", 1, None, saved.size_bytes,
                           saved.sha256)
        rec.log_checkpoint(str(outside / "ck"), "final", 2, None, kept.size_bytes, kept.sha256)
        rec.finish("completed")
        assert list(db.checkpoints().path) == ["runs/r/checkpoints/step-1", str(outside / "ck")]
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), moved)
    assert main(["--db", str(moved / "experiments.db"), "check"]) == 0     # from any working directory
    with expdb.open(moved / "experiments.db") as db:
        assert db.resolve_path(db.checkpoints().path[0]) == moved / "runs/r/checkpoints/step-1"
        assert db.mark_checkpoint_deleted(run_id, moved / "runs/r/checkpoints/step-1") == 1
