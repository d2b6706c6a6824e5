"""The trainer reaches the experiment database only through trainer.recorder.Database, found by
name in the ``smallgpt_lab.databases`` entry points (expdb registers itself in pyproject.toml).

Real parts: the installed project's entry point, real SQLite files, expdb's real merge."""
from __future__ import annotations

import inspect
import sqlite3
import tomllib
from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.recorder import DATABASES, Database, RunInfo, find_database

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_registers_expdb_under_the_trainers_group():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"][DATABASES] == {"expdb": "expdb.trainer_database:TrainerDatabase"}


def test_the_installed_database_answers_every_method_of_the_protocol():
    db = find_database()
    wanted = {name for name, _ in inspect.getmembers(Database, inspect.isfunction) if not name.startswith("_")}
    assert wanted == {"problems", "recorder", "mirror_warnings", "merge", "point_at_pack"}
    for name in wanted:
        mine, theirs = inspect.signature(getattr(Database, name)), inspect.signature(getattr(type(db), name))
        assert list(mine.parameters) == list(theirs.parameters), name


def test_an_unknown_database_is_refused_naming_the_flag_and_the_fix():
    with pytest.raises(ConfigError, match=r"--db: no experiment database named 'nosuchdb'.*pip install.*--no-db"):
        find_database("nosuchdb")


def test_problems_come_back_as_lines_and_nothing_is_created(tmp_path):
    db = find_database()
    missing = tmp_path / "absent.db"
    assert db.problems(missing, create=False, write=False) != []
    assert not missing.exists()
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("hello")
    assert db.problems(not_a_db, create=True, write=True) != []
    assert db.problems(tmp_path / "new.db", create=True, write=True) == []


def test_a_recorder_through_the_door_records_a_run_and_merge_summarises(tmp_path):
    db = find_database()
    source = tmp_path / "session1.db"
    recorder = db.recorder(str(source))
    run_id = recorder.start_run(RunInfo(name="r", config={}, dataset={}, tokenizer={}, n_params=1, device="cpu",
                                        precision="fp32", host="h"))
    recorder.log_step(1, {"loss": 2.0})
    recorder.finish("completed")
    assert run_id >= 1
    summaries = db.merge([source], into=str(tmp_path / "all.db"))
    assert len(summaries) == 1 and "session1.db" in summaries[0]
    with sqlite3.connect(tmp_path / "all.db") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert db.merge([], into=str(tmp_path / "none.db")) == [] and not (tmp_path / "none.db").exists()


def test_a_recorder_on_a_bad_url_is_a_config_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("not sqlite")
    with pytest.raises(ConfigError):
        find_database().recorder(str(bad))


@pytest.fixture
def nothing_installed(monkeypatch):
    """As in a checkout used without installing the project: no distribution, so no entry point
    (the metadata lookup answers nothing; the commands themselves are real)."""
    import trainer.recorder
    monkeypatch.setattr(trainer.recorder, "distributions", lambda: [])
    trainer.recorder.find_database.cache_clear()      # not the answer an earlier test's lookup kept
    yield
    trainer.recorder.find_database.cache_clear()


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_python_m_trainer_without_a_database_installed_exits_2_having_written_nothing(
        nothing_installed, tmp_path, monkeypatch, capsys):
    from trainer.__main__ import main

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n" * 50)
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "quick", "--data-files", str(corpus), "--db", "runs.db", "--out", "out"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--db 'runs.db': --db: no experiment database named 'expdb' is installed" in err
    assert "pip install -e ." in err and "--no-db" in err
    assert _listing(tmp_path) == before


def test_trainer_pack_without_a_database_installed_exits_2_having_written_nothing(
        nothing_installed, tmp_path, capsys):
    from trainer.pack import main

    (tmp_path / "run" / "final_model").mkdir(parents=True)
    (tmp_path / "run" / "final_model" / "config.json").write_text("{}")
    sqlite3.connect(tmp_path / "experiments.db").close()
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "run"), "--db", str(tmp_path / "experiments.db"), "--workdir", str(tmp_path)])
    assert stop.value.code == 2
    assert "no experiment database named 'expdb' is installed" in capsys.readouterr().err
    assert _listing(tmp_path) == before
