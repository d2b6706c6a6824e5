"""Bad input: each case gets an error that names the problem and the fix, exit status 2
from the command line, and leaves every file as it was.

Read-only places are made for real: a directory without write permission where the
tests run as a normal user; as root, whom permissions do not stop, the directory and
file get the immutable attribute (chattr +i), which stops root too. Where neither works
(a file system without attributes, no CAP_LINUX_IMMUTABLE) those tests are skipped with
the reason. A path under /proc, where nothing can be created, needs no setup.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

import expdb
from expdb.__main__ import main
from expdb.models import SCHEMA_VERSION
from test_expdb import make_info, record_run


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _lock(paths: list[Path]) -> list[str]:
    """Make ``paths`` unwritable; returns how to undo it."""
    if os.geteuid() != 0:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return ["chmod"]
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a directory read-only for root")
    result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({result.stderr.strip()}): cannot make a "
                    "directory read-only for root")
    return ["chattr"]


def _unlock(paths: list[Path], how: list[str]) -> None:
    if how == ["chattr"]:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
    else:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def shared_db(tmp_path: Path):
    """An experiment database in a read-only directory (as Kaggle mounts /kaggle/input)."""
    folder = tmp_path / "input"
    folder.mkdir()
    path = folder / "experiments.db"
    with expdb.open(path) as db:
        record_run(db, make_info("kept", study_name="s", trial_number=0))
    how = _lock([path, folder])
    if os.access(folder, os.W_OK):
        _unlock([path, folder], how)
        pytest.skip("the directory stayed writable: cannot test a read-only location here")
    yield path
    _unlock([path, folder], how)


def test_a_read_only_database_is_read_but_never_written(shared_db: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture):
    before = snapshot(shared_db.parent)
    with expdb.open(shared_db) as db:
        assert db.readonly and db.runs()["name"].tolist() == ["kept"]
        assert len(db.steps(1)) == 20 and len(db.step_series(1, max_points=10)) <= 10
        with pytest.raises(expdb.ReadOnlyDatabaseError, match="cannot record a run.*read-only.*Copy it"):
            db.recorder()
        with pytest.raises(expdb.ReadOnlyDatabaseError, match="read-only"):
            db.mark_checkpoint_deleted(1, "x")
    assert main(["--db", str(shared_db), "runs"]) == 0 and "kept" in capsys.readouterr().out
    assert main(["--db", str(shared_db), "check", "--no-files"]) == 0
    assert main(["--db", str(shared_db), "gc"]) == 2
    assert "cannot collect garbage" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "elsewhere.db"), "--into", str(shared_db)]) == 2
    # ...and as a merge source it is fine: the usual way to combine sessions' databases.
    assert main(["merge", str(shared_db), "--into", str(tmp_path / "all.db")]) == 0
    assert snapshot(shared_db.parent) == before                     # no -wal, no -shm, same bytes


def test_a_new_database_in_a_read_only_directory_is_refused(shared_db: Path):
    target = shared_db.parent / "new.db"
    with pytest.raises(expdb.ReadOnlyDatabaseError, match=f"cannot create the experiment database {target}.*"
                                                          "not writable.*Nothing was written"):
        expdb.open(target)
    assert not target.exists()


def test_a_path_where_nothing_can_be_created(capsys: pytest.CaptureFixture):
    target = Path("/proc/expdb-test/experiments.db")
    with pytest.raises(expdb.ReadOnlyDatabaseError, match="cannot create.*its directory cannot be made"):
        expdb.open(target)
    assert not target.parent.exists()
    assert main(["merge", str(Path(__file__).parent / "data" / "expdb_v2.db"), "--into", str(target)]) == 2
    assert "cannot create" in capsys.readouterr().err


def test_a_newer_schema_is_refused_everywhere_untouched(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "experiments.db"
    with expdb.open(path) as db:
        record_run(db, make_info())
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO expdb_schema_version (version, applied_at) VALUES (:v, '2030-01-01')"),
                     {"v": SCHEMA_VERSION + 1})
    engine.dispose()
    before = snapshot(tmp_path)
    for argv in (["runs"], ["show", "1"], ["check"], ["gc"], ["merge", str(path), "--into", str(tmp_path / "m.db")]):
        assert main(["--db", str(path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert f"schema version {SCHEMA_VERSION + 1}" in err and "pip install -U" in err, argv
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [["runs"], ["show", "1"], ["export", "1", "--format", "csv"], ["check"], ["gc"]])
def test_not_a_database_exits_2_untouched(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]):
    junk = tmp_path / "notes.db"
    junk.write_text("these are my notes, not a database\n" * 20)
    before = snapshot(tmp_path)
    assert main(["--db", str(junk), *argv]) == 2
    err = capsys.readouterr().err
    assert f"{junk} is not an experiment database" in err and "Pass the path of an experiment database" in err
    assert snapshot(tmp_path) == before


def test_not_a_database_as_merge_source_or_destination(tmp_path: Path, capsys: pytest.CaptureFixture):
    junk, good = tmp_path / "junk.db", tmp_path / "good.db"
    junk.write_bytes(b"\x89PNG\r\n" + bytes(500))
    with expdb.open(good) as db:
        record_run(db, make_info())
    before = snapshot(tmp_path)
    assert main(["merge", str(junk), "--into", str(good)]) == 2
    assert main(["merge", str(good), "--into", str(junk)]) == 2
    assert capsys.readouterr().err.count("is not an experiment database") == 2
    assert snapshot(tmp_path) == before


def test_unknown_run_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "experiments.db"
    with expdb.open(path) as db:
        record_run(db, make_info())
        for read in (db.run, db.steps, db.evals, db.step_series, lambda i: db.compare([1, i])):
            with pytest.raises(expdb.UnknownRunError, match="no run with id 7.*python -m expdb --db URL runs"):
                read(7)
    before = snapshot(tmp_path)
    for argv in (["show", "7"], ["export", "7", "--format", "json"]):
        assert main(["--db", str(path), *argv]) == 2
        assert "no run with id 7" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_cli_errors_are_one_line_from_a_real_process(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "expdb", "--db", str(tmp_path / "nope.db"), "show", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "no experiment database" in result.stderr and list(tmp_path.iterdir()) == []
