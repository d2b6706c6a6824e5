"""`python -m expdb`: a few real subprocesses (each costs ~1 s of imports), the rest in-process."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import expdb
from expdb.__main__ import main
from test_expdb import STEPS, make_info, record_run


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "experiments.db"
    with expdb.open(path) as db:
        run_id = record_run(db, make_info("cli-run", study_name="cli-study", trial_number=7))
        rec = db.recorder()
        rec.start_run(make_info("odd-values"))
        rec.log_step(1, {"loss": math.nan, "grad_norm": math.inf})
        rec.finish("failed", "nonfinite")
    assert run_id == 1
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expdb", *args], capture_output=True, text=True,
                          timeout=60)


def test_runs_lists_every_run(db_path: Path):
    result = cli("--db", str(db_path), "runs")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "name", "status"]
    assert "cli-run" in lines[1] and "cli-study" in lines[1] and "odd-values" in lines[2]


def test_export_csv_to_a_file(db_path: Path, tmp_path: Path):
    out = tmp_path / "steps.csv"
    result = cli("--db", str(db_path), "export", "1", "--format", "csv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with expdb.open(db_path) as db:
        pd.testing.assert_frame_equal(pd.read_csv(out), db.steps(1), check_dtype=False)


def test_errors_are_one_line_and_exit_2(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 10)
    result = cli("--db", str(junk), "runs")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "is not an experiment database" in result.stderr


def test_show_prints_record_and_epochs(db_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--db", str(db_path), "show", "1"]) == 0
    out = capsys.readouterr().out
    assert "name: cli-run" in out and "trial_number: 7" in out and '"out_dir": "runs/cli-run"' in out
    epoch_header = next(line for line in out.splitlines() if line.split()[:2] == ["epoch", "step"])
    assert "train_loss" in epoch_header


def test_export_json_is_strict_and_complete(db_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--db", str(db_path), "export", "1", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)   # no NaN tokens
    assert document["run"]["name"] == "cli-run" and len(document["steps"]) == STEPS
    assert [e["kind"] for e in document["events"]] == ["signal"]
    assert main(["--db", str(db_path), "export", "2", "--format", "json", "--table", "steps"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert (steps[0]["loss"], steps[0]["grad_norm"]) == ("nan", "inf")


@pytest.mark.parametrize("argv, message", [
    (["show", "99"], "no run with id 99"),
    (["export", "99", "--format", "csv"], "no run with id 99"),
])
def test_unknown_run_exits_2(db_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str):
    assert main(["--db", str(db_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_database_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--db", str(tmp_path / "nope.db"), "runs"]) == 2
    assert "no experiment database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_studies_lists_each_study(db_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--db", str(db_path), "studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["study_name", "n_runs", "n_completed"]
    assert lines[1].split()[:3] == ["cli-study", "1", "1"] and len(lines) == 2
