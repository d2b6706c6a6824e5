"""Comparisons of runs and studies: records by equality, PNG and HTML rendered into memory, and a
real study (runs through expdb's recorder, trials in Optuna's storage in the same SQLite file)."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from dashboards import render_comparison
from dashboards.compare_data import (ComparisonData, Curve, ParamPoints, TrialBest,
                                     build_comparison, fetch_comparison)
from dashboards.compare_html import comparison_plotly
from dashboards.compare_png import comparison_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def runs_frame(rows):
    """rows: (id, status, trial, best_val_loss, config) as db.runs() gives them."""
    return pd.DataFrame(dict(id=[r[0] for r in rows], name=[f"r{r[0]}" for r in rows],
                             status=[r[1] for r in rows], study_name="sweep",
                             trial_number=[r[2] for r in rows],
                             best_val_loss=[r[3] for r in rows], config=[r[4] for r in rows]))


def evals(steps, val):
    return pd.DataFrame(dict(step=list(steps), val_loss=list(val)))


RUNS = runs_frame([(1, "completed", 0, 3.0, dict(lr=1e-3, n_layer=2, out_dir="a", act="gelu")),
                   (2, "pruned", 1, 4.0, dict(lr=1e-2, n_layer=2, out_dir="b", act="relu")),
                   (3, "running", 2, np.nan, dict(lr=5e-4, n_layer=2, out_dir="c", act="gelu")),
                   (4, "completed", 3, 2.5, dict(lr=2e-4, n_layer=2, out_dir="d", act="gelu"))])
HISTORY = {1: (evals((10, 20), (3.5, 3.0)), None), 2: (evals((10,), (4.0,)), None),
           3: (evals((), ()), None), 4: (evals((10, 20), (3.0, 2.5)), None)}


def test_build_comparison_records():
    data = build_comparison(RUNS, HISTORY, "Study sweep", top=2)
    assert data == ComparisonData(
        title="Study sweep: 4 runs (2 completed, 1 pruned, 1 running)",
        curves=(Curve(4, "trial 3 (run 4)", "completed", (10.0, 20.0), (3.0, 2.5), 2.5),
                Curve(1, "trial 0 (run 1)", "completed", (10.0, 20.0), (3.5, 3.0), 3.0)),
        background=(Curve(2, "trial 1 (run 2) (pruned)", "pruned", (10.0,), (4.0,), 4.0),),
        trials=(TrialBest(1, "t0", "completed", math.exp(3.0)), TrialBest(2, "t1", "pruned", math.exp(4.0)),
                TrialBest(3, "t2", "running", None), TrialBest(4, "t3", "completed", math.exp(2.5))),
        params=(ParamPoints("act", ("gelu", "relu", "gelu"), (3.0, 4.0, 2.5),
                            ("completed", "pruned", "completed"), (1, 2, 4), categorical=True),
                ParamPoints("lr", (1e-3, 1e-2, 2e-4), (3.0, 4.0, 2.5),
                            ("completed", "pruned", "completed"), (1, 2, 4), log_x=True)),
        notes=())


def test_runs_across_studies_are_labelled_by_run_and_missing_validation_is_noted():
    runs = RUNS.assign(study_name=["a", "a", "b", "b"])
    data = build_comparison(runs, HISTORY, "Runs 1, 2, 3, 4", top=4)
    assert [c.label for c in data.curves] == ["run 4 r4, b t3", "run 1 r1, a t0",
                                              "run 2 r2, a t1 (pruned)"]
    assert data.notes == ("run 3 r3, b t2 (running): no validation yet",)
    assert [t.label for t in data.trials] == ["run 1", "run 2", "run 3", "run 4"]


def test_runs_that_share_every_setting_have_no_parameter_panels():
    runs = RUNS.assign(config=[dict(lr=1e-3, out_dir=str(i)) for i in range(4)])
    data = build_comparison(runs, HISTORY, "Runs", top=10)
    assert data.params == ()
    texts = [t.get_text() for t in comparison_figure(data).texts]
    assert any("no hyperparameter differs" in t for t in texts)


@pytest.mark.parametrize("fmt, head", [("png", PNG_SIGNATURE), ("html", b"<!DOCTYPE html>")])
@pytest.mark.parametrize("history", ["all", "none"])
def test_render_comparison(fmt, head, history):
    hist = HISTORY if history == "all" else {i: (evals((), ()), None) for i in HISTORY}
    data = build_comparison(RUNS, hist, "Study sweep", top=2)
    buf = io.BytesIO()
    render_comparison(data, buf, fmt=fmt, plotlyjs="inline")
    assert buf.getvalue().startswith(head)


def test_figures_label_every_panel_and_show_pruned_as_such():
    data = build_comparison(RUNS, HISTORY, "Study sweep", top=3)
    fig = comparison_figure(data)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Validation loss of the best 3 runs", "Best perplexity per run", "act", "lr"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["validation loss (nats)", "best validation perplexity",
                                                    "best validation loss (nats)", "best validation loss (nats)"]
    curves = fig.axes[0]
    assert curves.get_lines()[2].get_linestyle() == "--"          # the pruned curve is dashed
    assert "pruned" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    pfig = comparison_plotly(data)
    assert {t.name for t in pfig.data if t.type == "bar"} == {"completed", "pruned", "running"}
    assert any(t.marker.symbol == "x" for t in pfig.data if t.type == "scatter" and t.marker)


# -- a real study ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study_db(tmp_path_factory):
    expdb = pytest.importorskip("expdb")
    from bench.synthetic import write_study

    db = expdb.open(tmp_path_factory.mktemp("study") / "exp.db")
    write_study(db, "mini", 6, pruned=(2, 4))
    yield db
    db.close()


def test_fetch_comparison_of_a_study(study_db):
    data = fetch_comparison(study_db, study="mini", top=3)
    assert data.title == "Study mini: 6 runs (4 completed, 2 pruned)"
    assert len(data.curves) == 3 and len(data.background) == 3
    bests = [c.best for c in data.curves + data.background]
    assert bests == sorted(bests)
    pruned = [c for c in data.curves + data.background if c.state == "pruned"]
    assert len(pruned) == 2 and all(c.x[-1] == 20.0 for c in pruned)      # stopped at step 20
    assert [t.label for t in data.trials] == [f"t{i}" for i in range(6)]
    assert [t.state for t in data.trials] == ["completed", "completed", "pruned", "completed",
                                              "pruned", "completed"]
    assert [p.name for p in data.params] == ["lr", "micro_batch", "n_layer"]
    lr = data.params[0]
    assert lr.log_x or max(lr.values) / min(lr.values) < 20


def test_fetch_comparison_of_chosen_runs(study_db):
    data = fetch_comparison(study_db, run_ids=[5, 1, 5], top=10)
    assert data.title.startswith("Runs 5, 1: 2 runs")
    assert {c.run_id for c in data.curves} == {1, 5}
    with pytest.raises(LookupError, match="^run_ids: no run with id 98, 99$"):
        fetch_comparison(study_db, run_ids=[1, 99, 98])
