"""The experiment database on a full disk: rows the writer cannot commit wait in memory and
are retried until space is freed; a run that ends with rows unwritten says so in one line.

A real small filesystem (a tmpfs, mounted as root as on CI) filled to ENOSPC, and an
injected "database or disk is full" for machines that cannot mount one.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy.exc

import expdb
from expdb._write.writer import BufferedWriter
from test_expdb import make_info

FULL = "database or disk is full"


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MB tmpfs of our own; unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
    except OSError as exc:
        pytest.skip(f"cannot run mount ({exc}); the injected variant below covers the writer")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s filesystem (written until ENOSPC)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == 28, exc     # ENOSPC
    try:        # the last few bytes too
        while True:
            os.write(fd, b"\0")
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def log_steps(rec, steps: range) -> None:
    for s in steps:
        rec.log_step(s, {"loss": 1.0 / (s + 1), "lr": 0.001, "grad_norm": 2.0})


def test_rows_written_on_a_full_disk_arrive_once_space_is_freed(small_fs, caplog):
    caplog.set_level(logging.WARNING, logger="expdb")    # whatever level an earlier test left the root at
    db = expdb.open(small_fs / "experiments.db")
    rec = db.recorder(flush_interval_s=0.05, finish_timeout_s=60)
    run_id = rec.start_run(make_info("full-disk"))
    log_steps(rec, range(100))
    assert rec._writer.flush(30)
    filler = fill(small_fs)
    log_steps(rec, range(100, 20_000))      # far more than the WAL file's room: it must grow
    rec.log_eval(19_999, 0, {"val_loss": 2.5})
    rec.log_event("oom", 19_999, {"micro_batch": 4})
    assert not rec._writer.flush(2)         # the disk is full: not written, kept
    assert rec._writer.pending >= 19_900
    assert FULL in str(rec._writer.last_error)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the disk is full" in w and "free space on its disk" in w and "rows kept in memory" in w
               for w in warnings), warnings
    filler.unlink()
    rec.finish("completed")
    assert rec.unwritten_rows == 0
    assert len(db.steps(run_id)) == 20_000
    assert list(db.steps(run_id).step) == list(range(20_000))
    assert len(db.evals(run_id)) == 1 and list(db.events(run_id).kind) == ["oom"]
    assert db.run(run_id).status == "completed"
    db.close()


def test_a_run_that_ends_on_a_full_disk_says_how_many_rows_are_unwritten(small_fs, caplog):
    caplog.set_level(logging.WARNING, logger="expdb")
    db = expdb.open(small_fs / "experiments.db")
    rec = db.recorder(flush_interval_s=0.05, finish_timeout_s=0.5)
    run_id = rec.start_run(make_info("full-at-the-end"))
    log_steps(rec, range(50))
    assert rec._writer.flush(30)
    filler = fill(small_fs)
    log_steps(rec, range(50, 20_050))
    rec.finish("completed")                 # retries for 0.5 s, then says so; never raises
    assert rec.unwritten_rows == 20_001     # the steps, and the run row's final status
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"expdb: 20001 rows of run {run_id} are not written after 0.5 s of retries: "
                      f"{small_fs / 'experiments.db'}: the disk is full ({FULL}); free space on its disk. "
                      "They are lost when this process exits (the rows written before are kept)"]
    filler.unlink()
    assert len(db.steps(run_id)) == 50      # what was written before is intact
    assert db.run(run_id).status == "running"
    db.close()


def test_an_injected_full_disk_keeps_every_row_until_it_has_room(tmp_path, monkeypatch, caplog):
    """The same without a mount: the writer's transaction fails as SQLite fails on ENOSPC."""
    room = {"full": True}
    write = BufferedWriter._write

    def full_disk(self, conn, *args):
        if room["full"]:
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception(FULL))
        return write(self, conn, *args)

    db = expdb.open(tmp_path / "experiments.db")
    rec = db.recorder(flush_interval_s=0.05)
    run_id = rec.start_run(make_info("injected"))
    monkeypatch.setattr(BufferedWriter, "_write", full_disk)
    log_steps(rec, range(500))
    assert not rec._writer.flush(0.5)
    assert rec._writer.pending == 500 and len(db.steps(run_id)) == 0
    assert "free space on its disk" in str(rec._writer.last_error)
    room["full"] = False
    rec.finish("completed")
    assert rec.unwritten_rows == 0
    assert list(db.steps(run_id).step) == list(range(500))
    assert db.run(run_id).status == "completed"
    db.close()


class FillingRecorder:
    """Forwards to a DBRecorder; fills the database's filesystem when the trainer logs step
    ``full_at`` and frees it at the first step from ``free_at`` on after a checkpoint was
    reported while full (steps, not seconds, decide when)."""

    def __init__(self, inner, folder: Path, full_at: int, free_at: int):
        self.inner, self.folder, self.full_at, self.free_at = inner, folder, full_at, free_at
        self.filler: Path | None = None
        self.while_full: list[str] = []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def forwarded(*args, **kwargs):
            step = args[0] if name == "log_step" else None
            if step == self.full_at:
                self.filler = fill(self.folder)
            if self.filler is not None:
                self.while_full.append(name)
            result = method(*args, **kwargs)
            if self.filler is not None and step is not None and step >= self.free_at \
                    and "log_checkpoint" in self.while_full:
                self.filler.unlink()
                self.filler = None
            return result
        return forwarded


@pytest.mark.slow
def test_a_training_run_whose_database_disk_fills_up_loses_no_row(small_fs, tiny_cfg, tiny_data, caplog):
    from trainer.run import train

    caplog.set_level(logging.WARNING, logger="expdb")
    db = expdb.open(small_fs / "experiments.db")
    recorder = FillingRecorder(db.recorder(), small_fs, full_at=10, free_at=45)
    result = train(tiny_cfg.replace(epochs=4), recorder, data=tiny_data, log=lambda *_: None)
    assert {"log_step", "log_eval", "log_epoch", "log_checkpoint"} <= set(recorder.while_full)
    assert recorder.filler is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "expdb"]
    assert any("the disk is full" in w for w in warnings), warnings     # the writes did fail...
    assert any("works again" in w for w in warnings), warnings
    with db:                                                            # ...and nothing was lost
        assert result.status == "completed" and db.run(result.run_id).status == "completed"
        assert list(db.steps(result.run_id).step) == list(range(1, result.steps + 1))
        assert len(db.epochs(result.run_id)) == 4
        assert len(db.checkpoints(result.run_id)) >= 4
