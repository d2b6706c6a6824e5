"""The study report: records from Optuna trials (by equality), notes in place of plots Optuna cannot
draw, the HTML page rendered into memory, and a real study in the experiment database's file."""
from __future__ import annotations

import io
import math
import re

import pandas as pd
import pytest

optuna = pytest.importorskip("optuna")

from optuna.distributions import FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

import dashboards  # noqa: E402
from dashboards.errors import ReportError  # noqa: E402
from dashboards.report_data import (NO_COMPLETED, PLOTS, Plot, ReportData, TrialRow, build_report,  # noqa: E402
                                    fetch_report, plot_notes)
from dashboards.report_html import render_report  # noqa: E402

DISTS = dict(lr=FloatDistribution(1e-4, 1e-2, log=True), n_layer=IntDistribution(1, 4))


def trial(number, state, value=None, params=None, steps=(), run_id=None):
    attrs = {"run_id": run_id} if run_id is not None else {}
    t = create_trial(state=state, value=value, params=params or dict(lr=1e-3, n_layer=2),
                     distributions=DISTS, user_attrs=attrs,
                     intermediate_values={s: 5.0 - s / 100 for s in steps})
    t.number = number
    return t


def study_runs(rows):
    return pd.DataFrame(dict(trial_number=[r[0] for r in rows], run_id=[r[1] for r in rows],
                             status=[r[2] for r in rows], best_val_loss=[r[3] for r in rows],
                             status_reason=[r[4] for r in rows]))


def test_build_report_records():
    trials = [trial(1, TrialState.PRUNED, params=dict(lr=1e-2, n_layer=1), steps=(10,), run_id=8),
              trial(0, TrialState.COMPLETE, 3.0, steps=(10, 20), run_id=7)]
    runs = study_runs([(0, 7, "completed", 3.0, None), (1, 8, "pruned", 4.5, "MedianPruner at step 10")])
    data = build_report("s", "minimize", trials, runs)
    assert data == ReportData(
        study="s", direction="minimize",
        trials=(TrialRow(0, 7, "complete", "completed", 3.0, math.exp(3.0), 0.0,
                         (("lr", 1e-3), ("n_layer", 2)), "", 3.0),
                TrialRow(1, 8, "pruned", "pruned", 4.5, math.exp(4.5), 0.0,
                         (("lr", 1e-2), ("n_layer", 1)), "MedianPruner at step 10", 4.5)),
        param_names=("lr", "n_layer"),
        plots=(Plot("optimization_history", "Optimization history", None),
               Plot("param_importances", "Parameter importances",
                    "needs at least 2 completed trials (this study has 1)"),
               Plot("parallel_coordinate", "Parallel coordinates", None),
               Plot("intermediate_values", "Intermediate values (pruning)", None)),
        best=0)
    assert data.counts == {"complete": 1, "pruned": 1}


def test_trials_without_a_run_id_attribute_are_linked_by_trial_number():
    data = build_report("s", "minimize", [trial(0, TrialState.COMPLETE, 3.0)],
                        study_runs([(0, 12, "completed", 3.0, None)]))
    assert data.trials[0].run_id == 12


@pytest.mark.parametrize("trials, notes", [
    ([], (NO_COMPLETED, "needs at least 2 completed trials (this study has 0)", NO_COMPLETED,
          "no trial has reported intermediate values yet")),
    ([trial(0, TrialState.COMPLETE, 3.0), trial(1, TrialState.COMPLETE, 2.0)],
     (None, "the completed trials all have the same parameters", None,
      "no trial has reported intermediate values yet")),
    ([trial(0, TrialState.COMPLETE, 3.0, steps=(5,)),
      trial(1, TrialState.COMPLETE, 2.0, params=dict(lr=1e-2, n_layer=3))], (None,) * 4),
])
def test_plots_optuna_cannot_draw_get_a_note(trials, notes):
    assert tuple(p.note for p in plot_notes(trials)) == notes
    assert tuple(p.name for p in plot_notes(trials)) == PLOTS


def render(data, study=None):
    buf = io.BytesIO()
    render_report(data, study, buf, plotlyjs="directory")
    return buf.getvalue().decode()


def test_report_of_an_empty_study_is_all_notes():
    page = render(build_report("empty", "minimize", []))
    assert page.count('class="note"') == 4 and "<tbody>\n\n</tbody>" in page
    assert '<script src="plotly.min.js"' in page


# -- a real study: runs through the recorder, trials in Optuna's storage in the same file -------------
@pytest.fixture(scope="module")
def study_db(tmp_path_factory):
    expdb = pytest.importorskip("expdb")
    from bench.synthetic import write_study

    path = tmp_path_factory.mktemp("study") / "exp.db"
    db = expdb.open(path)
    write_study(db, "mini", 5, pruned=(1,))
    yield db
    db.close()


def test_fetch_report_links_trials_to_runs(study_db):
    data, study = fetch_report(study_db, "mini", study_db.url)
    assert [(t.number, t.run_id, t.state, t.run_status) for t in data.trials] == [
        (0, 1, "complete", "completed"), (1, 2, "pruned", "pruned"), (2, 3, "complete", "completed"),
        (3, 4, "complete", "completed"), (4, 5, "complete", "completed")]
    assert data.trials[1].note == "pruned at step 20"
    assert data.best == min((t for t in study.trials if t.value is not None and
                             t.state == TrialState.COMPLETE), key=lambda t: t.value).number
    assert all(p.note is None for p in data.plots)
    page = render(data, study)
    assert page.count('class="plot"') == 4 and 'class="note"' not in page
    assert page.count("Plotly.newPlot") == 4
    assert re.search(r'<tr class="pruned" id="trial-1"><td>1</td><td>2</td>', page)
    assert 'class="complete best"' in page


def test_write_study_report(study_db, tmp_path):
    out = dashboards.write_study_report(study_db.url, "mini", tmp_path / "r" / "report.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r" / "plotly.min.js").is_file()


def test_unknown_study_and_storage_without_optuna_are_refused(study_db, tmp_path):
    with pytest.raises(ReportError, match=r"^--study nope: no Optuna study of that name in .*; it has mini$"):
        fetch_report(study_db, "nope", study_db.url)
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    with pytest.raises(ReportError, match="no such SQLite file"):
        fetch_report(study_db, "mini", missing)
    assert not (tmp_path / "missing.db").exists()                  # not created by the attempt
    import expdb

    expdb.open(tmp_path / "plain.db").close()
    with pytest.raises(ReportError, match=r"not an Optuna storage \(no such table"):
        fetch_report(study_db, "mini", f"sqlite:///{tmp_path / 'plain.db'}")
