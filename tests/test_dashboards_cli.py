"""python -m dashboards on a real database (two studies recorded through expdb, their trials in
Optuna's storage in the same file): every output, and every refusal (exit 2, nothing written)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from dashboards import __main__ as cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
expdb = pytest.importorskip("expdb")


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    from bench.synthetic import write_study

    path = tmp_path_factory.mktemp("db") / "exp.db"
    with expdb.open(path) as db:
        write_study(db, "mini", 4, pruned=(1,))          # runs 1-4
        write_study(db, "other", 2, pruned=(), seed=1)    # runs 5-6
    return path


@pytest.fixture
def db_copy(study_file, tmp_path, monkeypatch):
    """A private copy in a fresh working directory; yields its name."""
    for suffix in ("", "-wal"):          # rows still in the write-ahead log are part of the file
        if study_file.with_name(study_file.name + suffix).exists():
            shutil.copy(study_file.with_name(study_file.name + suffix), tmp_path / f"exp.db{suffix}")
    monkeypatch.chdir(tmp_path)
    return "exp.db"


def files(path):
    return sorted(p.name for p in path.iterdir() if p.name != "exp.db" and not p.name.startswith("exp.db-"))


def test_study_outputs_in_one_command(db_copy, tmp_path, capsys):
    argv = ["--db", db_copy, "--study", "mini", "--out", "compare.html", "--report", "report.html",
            "--table", "trials.csv", "--top", "2"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "wrote report.html\nwrote compare.html\nwrote trials.csv\n"
    assert files(tmp_path) == ["compare.html", "plotly.min.js", "report.html", "trials.csv"]
    report = (tmp_path / "report.html").read_text()
    assert report.count("Plotly.newPlot") == 4 and "class=\"note\"" not in report
    assert "Parameter importances" in report
    compare = (tmp_path / "compare.html").read_text()
    assert "trial 1 (run 2) (pruned)" in compare and len(compare) < 300_000
    lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert lines[0].startswith("run_id,study_name,trial_number") and len(lines) == 5


def test_run_png_and_table_and_runs_across_studies(db_copy, tmp_path):
    assert cli.main(["--db", db_copy, "--run", "2"]) == 0                 # default --out
    assert (tmp_path / "dashboard.png").read_bytes().startswith(PNG_SIGNATURE)
    assert cli.main(["--db", db_copy, "--run", "2", "--table", "m.json"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["run_id"] == 2
    assert cli.main(["--db", db_copy, "--runs", "5", "1", "--out", "x.png", "--table", "x.json",
                     "--plotlyjs", "inline"]) == 0
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [r["study_name"] for r in json.loads((tmp_path / "x.json").read_text())["runs"]] == [
        "mini", "other"]
    assert files(tmp_path) == ["dashboard.png", "m.json", "x.json", "x.png"]


@pytest.mark.parametrize("argv, message", [
    (["--run", "99"], r"--run 99: no run with id 99 in exp.db; list the runs with"),
    (["--runs", "1", "98", "99"], r"--runs 1 98 99: no run with id 98, 99 in exp.db"),
    (["--run", "1", "--out", "d.jpg"], r"--out d.jpg: writes .png or .html files, not .jpg; use e.g. --out d.png"),
    (["--runs", "1", "--table", "t.xlsx"], r"--table t.xlsx: writes .csv or .json files"),
    (["--run", "1", "--out", "no/such/dir/d.png"], r"--out no/such/dir/d.png: directory no/such/dir does not exist"),
    (["--study", "nope"], r"--study nope: no runs recorded for this study"),
    (["--study", "nope", "--report", "r.html"], r"--study nope: no Optuna study of that name in .*; it has mini, other"),
    (["--study", "mini", "--top", "0"], r"--top 0: use a positive number"),
    (["--run", "1", "--report", "r.html"], r"--report r.html: a report is of a study; use --study NAME"),
    (["--study", "mini", "--storage", "sqlite:///x.db"], r"--storage sqlite:///x.db: only used with --report"),
    (["--study", "mini", "--report", "r.html", "--storage", "x.db"], r"--storage x.db: not a URL"),
    (["--study", "mini", "--report", "r.html", "--storage", "sqlite:///gone.db"],
     r"--storage sqlite:///gone.db: no such SQLite file gone.db"),
    (["--study", "mini", "--watch", "5"], r"--watch 5: watches one run; use it with --run ID"),
    (["--run", "1", "--watch", "0"], r"--watch 0: use a positive number of seconds"),
    (["--run", "1", "--watch", "5", "--table", "t.csv"], r"--watch 5: re-renders --out only; drop --table"),
    (["--run", "1", "--watch-iterations", "2"], r"--watch-iterations 2: only with --watch"),
    (["--study", "mini", "--out", "a.html", "--report", "./a.html"], r"a.html ./a.html: two outputs have the same name"),
])
def test_refusals_name_flag_value_and_fix_and_write_nothing(db_copy, tmp_path, capsys, argv, message):
    assert cli.main(["--db", db_copy, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match("error: " + message, err), err
    assert files(tmp_path) == []


def test_every_problem_is_listed_at_once(db_copy, tmp_path, capsys):
    assert cli.main(["--db", db_copy, "--run", "1", "--out", "d.gif", "--top", "0", "--watch", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["error", "error", "error"]
    assert [line.split()[1] for line in err] == ["--out", "--top", "--watch"]
    assert files(tmp_path) == []


def test_a_valid_output_is_not_written_when_another_fails(db_copy, tmp_path, capsys):
    assert cli.main(["--db", db_copy, "--study", "mini", "--out", "c.png", "--report", "r.html",
                     "--storage", f"sqlite:///{tmp_path / 'exp.db'}x"]) == 2
    assert files(tmp_path) == []


def test_missing_database(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--db", "missing.db", "--run", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --db missing.db: no such file;")
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point(db_copy, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dashboards", "--db", db_copy, "--run", "1",
                           "--out", "d.jpg"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --out d.jpg:")
