"""Metric tables: records by equality, CSV and JSON rendered in memory and parsed back, and a real
database's run and study written to files."""
from __future__ import annotations

import csv
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dashboards.tables import (RUN_COLUMNS, Table, run_table, summary_table, to_csv, to_json,
                               write_metrics_table)

RUN = SimpleNamespace(id=3, name="tiny", status="completed", study_name="s", trial_number=1,
                      best_val_loss=3.0, best_step=20)
EVALS = pd.DataFrame(dict(step=[10, 20], epoch=[0, 0], val_loss=[3.5, np.nan], val_ppl=[33.1, np.nan]))
EPOCHS = pd.DataFrame(dict(epoch=[0], step=[20.0], train_loss=[3.2], val_loss=[3.0], epoch_seconds=[1.5],
                           mem_gpu_peak_mb=[np.nan]))


def test_run_table_records():
    table = run_table(RUN, EVALS, EPOCHS)
    none = (None,) * (len(RUN_COLUMNS) - 6)
    assert table == Table(
        header=(("run_id", 3), ("name", "tiny"), ("status", "completed"), ("study_name", "s"),
                ("trial_number", 1), ("best_val_loss", 3.0), ("best_val_bpb", None), ("best_step", 20)),
        rows_key="metrics", columns=RUN_COLUMNS,
        rows=(("eval", 0, 10, None, 3.5, 33.1) + none,
              ("eval", 0, 20, None, None, None) + none,
              ("epoch", 0, 20, 3.2, 3.0, None, None, None, None, None, 1.5) + (None,) * (len(RUN_COLUMNS) - 11)))


def test_csv_and_json_hold_the_same_rows():
    table = run_table(RUN, EVALS, EPOCHS)
    rows = list(csv.DictReader(io.StringIO(to_csv(table).decode())))
    assert [r["kind"] for r in rows] == ["eval", "eval", "epoch"]
    assert rows[0]["val_loss"] == "3.5" and rows[1]["val_loss"] == "" and rows[2]["step"] == "20"
    doc = json.loads(to_json(table))
    assert doc["run_id"] == 3 and doc["columns"] == list(RUN_COLUMNS)
    assert doc["metrics"][1] == dict(zip(RUN_COLUMNS, ("eval", 0, 20) + (None,) * (len(RUN_COLUMNS) - 3)))


def test_empty_run_gives_header_only():
    table = run_table(RUN, pd.DataFrame(), pd.DataFrame())
    assert table.rows == () and to_csv(table).decode() == ",".join(RUN_COLUMNS) + "\n"


def test_summary_table_has_differing_params_and_perplexity():
    runs = pd.DataFrame(dict(
        id=[2, 1], study_name="s", trial_number=[1, 0], name=["b", "a"], status=["pruned", "completed"],
        status_reason=["pruned at step 20", None], best_val_loss=[4.0, np.nan], best_step=[20, None],
        n_steps=[20, 40], n_epochs=[0, 1], resume_count=0, duration_s=[1.0, 2.0],
        started_at=pd.Timestamp("2026-01-02 03:04:05"), ended_at=pd.NaT,
        config=[dict(lr=0.01, seed=1, out_dir="x"), dict(lr=0.001, seed=1, out_dir="y")]))
    table = summary_table(runs, (("study", "s"),))
    assert table.columns[-1] == "param_lr" and "param_seed" not in table.columns
    assert table.rows[0] == (1, "s", 0, "a", "completed", None, None, None, None, None, 40, 1, 0, 2.0,
                             "2026-01-02T03:04:05", None, 0.001)
    assert table.rows[1][6:8] == (4.0, pytest.approx(math.exp(4.0)))
    assert json.loads(to_json(table))["runs"][1]["status_reason"] == "pruned at step 20"


@pytest.fixture
def study_db(tmp_path):
    expdb = pytest.importorskip("expdb")
    from bench.synthetic import write_study

    with expdb.open(tmp_path / "exp.db") as db:
        write_study(db, "mini", 3, pruned=(1,))
        yield db


def test_tables_of_a_real_run_and_study(study_db, tmp_path):
    run_csv = write_metrics_table(study_db, tmp_path / "run.csv", run_id=2)
    rows = list(csv.DictReader(run_csv.open()))
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", "10"), ("eval", "20"), ("epoch", "20")]
    doc = json.loads(write_metrics_table(study_db, tmp_path / "study.json", study="mini").read_text())
    assert doc["study"] == "mini"
    assert [(r["trial_number"], r["status"]) for r in doc["runs"]] == [
        (0, "completed"), (1, "pruned"), (2, "completed")]
    assert {"param_lr", "param_n_layer"} <= set(doc["columns"])
    picked = json.loads(write_metrics_table(study_db, tmp_path / "runs.json", run_ids=[3, 1]).read_text())
    assert picked["run_ids"] == [3, 1] and [r["run_id"] for r in picked["runs"]] == [1, 3]
