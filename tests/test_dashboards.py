"""dashboards: records by equality, reduce_minmax properties, renders into BytesIO, the CLI."""
from __future__ import annotations

import io
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

import dashboards
from dashboards import __main__ as cli
from dashboards.compare import (ComparisonData, Curve, build_comparison, build_curve,
                                comparison_figure, render_comparison)
from dashboards.data import (NO_EPOCHS, NO_STEPS, NO_VALIDATION, Marker, Panel, Series, Title,
                             build_run_data, fetch_run_data)
from dashboards.series import reduce_minmax
from dashboards.training import build_figure, render_run_dashboard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, lr=0.001, micro_batch=8,
              grad_accum=2, grad_clip=1.0, precision="auto")


# -- fixtures: a run as the DataFrames expdb returns ----------------------------------------
def make_run(run_id=1, name="tiny", status="completed", best_step=None, **kw):
    fields = dict(id=run_id, name=name, status=status, status_reason=None, study_name=None,
                  trial_number=None, config=dict(CONFIG), dataset={}, tokenizer={},
                  n_params=123_456, device="cpu", precision="fp32", host="box", started_at=None,
                  ended_at=None, resume_count=0, best_val_loss=None, best_step=best_step)
    return SimpleNamespace(**{**fields, **kw})


def steps_frame(loss=(5.0, 4.0, 3.0, 2.5), start=1):
    step = np.arange(start, start + len(loss))
    return pd.DataFrame(dict(run_id=1, step=step, epoch=0, loss=list(loss), lr=1e-3 * step,
                             grad_norm=0.5 * step, tokens_per_s=1e4, tokens_seen=step * 256))


def evals_frame(steps=(2, 4), val=(4.5, 3.0)):
    return pd.DataFrame(dict(run_id=1, step=list(steps), epoch=0, val_loss=list(val),
                             val_ppl=np.exp(val)))


def epochs_frame(n=2, gpu=False, val=True):
    gpu_mb = [1000.0 + e for e in range(n)] if gpu else [np.nan] * n
    return pd.DataFrame(dict(
        run_id=1, epoch=list(range(n)), step=[2 * (e + 1) for e in range(n)],
        train_loss=[4.0 - e for e in range(n)], val_loss=[4.2 - e for e in range(n)] if val else np.nan,
        val_ppl=np.nan, lr=1e-3, grad_norm=0.5, epoch_seconds=[10.0 + e for e in range(n)],
        tokens_per_s=1e4, mem_process_mb=[500.0 + e for e in range(n)], mem_gpu_allocated_mb=gpu_mb,
        mem_gpu_reserved_mb=gpu_mb, mem_gpu_peak_mb=gpu_mb, recorded_at=pd.Timestamp("2024-01-01")))


def events_frame(rows=(("resume", 3), ("oom", 2), ("signal", 4))):
    return pd.DataFrame(dict(id=range(len(rows)), run_id=1, kind=[k for k, _ in rows],
                             step=[s for _, s in rows], detail=[{}] * len(rows), created_at=None))


def checkpoints_frame(rows=(("periodic", 2, 4.5), ("best", 4, 3.0), ("final", 4, 3.0))):
    return pd.DataFrame(dict(id=range(len(rows)), run_id=1, path="p", kind=[r[0] for r in rows],
                             step=[r[1] for r in rows], val_loss=[r[2] for r in rows], size_bytes=1,
                             sha256="x", created_at=None, deleted=False))


def full_data(**run_kw):
    return build_run_data(make_run(**run_kw), steps_frame(), evals_frame(), epochs_frame(),
                          checkpoints_frame(), events_frame())


def empty(columns=()):
    return pd.DataFrame(columns=list(columns))


# -- reduce_minmax ----------------------------------------------------------------------------
def test_reduce_minmax_leaves_short_series_alone():
    x, y = np.arange(5.0), np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    rx, ry = reduce_minmax(x, y, 10)
    assert rx.tolist() == x.tolist() and ry.tolist() == y.tolist()


@pytest.mark.parametrize("n, max_points", [(10, 4), (1001, 100), (100_000, 2000), (54_321, 777)])
def test_reduce_minmax_properties(n, max_points):
    rng = np.random.default_rng(n)
    x = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(float)
    y = rng.normal(size=n)
    y[n // 3], y[2 * n // 3] = 50.0, -50.0                     # a spike and a dip
    rx, ry = reduce_minmax(x, y, max_points)
    assert len(rx) == len(ry) <= max_points
    assert ry.max() == y.max() == 50.0 and ry.min() == y.min() == -50.0
    assert np.all(np.diff(rx) > 0)                              # x stays strictly increasing
    assert (rx[0], rx[-1]) == (x[0], x[-1])                     # the x range is unchanged
    assert set(rx.tolist()) <= set(x.tolist())                  # a subsequence of the input


def test_reduce_minmax_rejects_too_few_points():
    with pytest.raises(ValueError, match="max_points=3"):
        reduce_minmax(np.arange(10.0), np.arange(10.0), 3)


# -- records ------------------------------------------------------------------------------------
def test_title_lists_run_study_and_hyperparameters():
    data = full_data(study_name="sweep", trial_number=3)
    assert data.title == Title(
        run_id=1, name="tiny", status="completed", study="sweep", trial=3,
        hparams=(("n_layer", "2"), ("n_embd", "64"), ("n_head", "2"), ("block_size", "32"),
                 ("lr", "0.001"), ("batch", "8x2"), ("precision", "fp32"), ("params", "123k")))


def test_step_panels_records():
    data = full_data()
    steps = (1.0, 2.0, 3.0, 4.0)
    assert data.loss == Panel("Loss", "step", "loss (nats)", (
        Series("train_step", "train (per step)", steps, (5.0, 4.0, 3.0, 2.5)),
        Series("train_epoch", "train (epoch mean)", (2.0, 4.0), (4.0, 3.0)),
        Series("val", "validation", (2.0, 4.0), (4.5, 3.0))))
    assert data.perplexity.series[1] == Series("val", "validation", (2.0, 4.0),
                                               (math.exp(4.5), math.exp(3.0)))
    assert data.perplexity.series[0].y == pytest.approx(np.exp([5.0, 4.0, 3.0, 2.5]))
    assert data.perplexity.log_y
    assert data.lr == Panel("Learning rate", "step", "learning rate",
                            (Series("lr", "learning rate", steps, (0.001, 0.002, 0.003, 0.004)),))
    assert data.grad_norm == Panel("Gradient norm", "step", "gradient norm (L2)", (
        Series("grad", "gradient norm", steps, (0.5, 1.0, 1.5, 2.0)),
        Series("clip", "clip = 1", (), (1.0,))))


def test_epoch_panels_records():
    data = full_data()
    assert data.epoch_time == Panel("Epoch duration", "epoch", "seconds",
                                    (Series("epoch_seconds", "wall time", (0.0, 1.0), (10.0, 11.0)),),
                                    by_step=False)
    assert data.memory == Panel("Process memory (RSS) per epoch", "epoch", "MB",
                                (Series("mem_process", "process RSS", (0.0, 1.0), (500.0, 501.0)),),
                                by_step=False, from_zero=True)


def test_memory_panel_prefers_gpu_columns():
    data = build_run_data(make_run(), steps_frame(), evals_frame(), epochs_frame(gpu=True))
    assert data.memory.title == "GPU memory per epoch"
    assert [s.label for s in data.memory.series] == ["GPU allocated", "GPU reserved", "GPU peak"]
    assert data.memory.series[0].y == (1000.0, 1001.0)


def test_markers_from_events_and_best_step():
    data = build_run_data(make_run(best_step=3), steps_frame(), events=events_frame())
    assert data.markers == (Marker("oom", 2.0), Marker("best", 3.0), Marker("resume", 3.0))


def test_best_marker_falls_back_to_best_checkpoint():
    ckpts = checkpoints_frame((("periodic", 1, 2.0), ("best", 2, 4.0), ("best", 3, 3.5)))
    assert build_run_data(make_run(), checkpoints=ckpts).markers == (Marker("best", 3.0),)
    ckpts = checkpoints_frame((("periodic", 1, 2.0), ("final", 2, np.nan)))
    assert build_run_data(make_run(), checkpoints=ckpts).markers == (Marker("best", 1.0),)


def test_validation_falls_back_to_epoch_rows():
    data = build_run_data(make_run(), steps_frame(), empty(["step", "val_loss"]), epochs_frame())
    assert data.validation == Series("val", "validation", (2.0, 4.0), (4.2, 3.2))


def test_no_validation_yet():
    data = build_run_data(make_run(status="running"), steps_frame(), None, epochs_frame(1, val=False))
    assert data.validation is None
    assert NO_VALIDATION in data.loss.notes and NO_VALIDATION in data.perplexity.notes


def test_nan_losses_are_dropped_and_noted():
    data = build_run_data(make_run(), steps_frame((5.0, float("nan"), float("inf"), 3.0)),
                          evals_frame((2, 4), (float("nan"), 3.5)))
    assert data.loss.series[0].x == (1.0, 4.0)
    assert data.loss.notes == ("2 non-finite training loss values not drawn",
                               "1 non-finite validation loss value not drawn")


def test_empty_run_has_a_note_on_every_panel():
    data = build_run_data(make_run(status="running"), empty(), empty(), empty(), empty(), empty())
    assert all(p.series == () or p.series[0].role == "clip" for p in data.panels)
    assert data.loss.notes == (NO_STEPS, NO_VALIDATION)
    assert data.lr.notes == data.grad_norm.notes == (NO_STEPS,)
    assert data.epoch_time.notes == data.memory.notes == (NO_EPOCHS,)
    assert data.markers == ()


def test_long_runs_are_reduced():
    n = 100_000
    loss = np.linspace(8, 2, n)
    loss[n // 2] = 20.0
    data = build_run_data(make_run(), steps_frame(loss), max_points=500)
    for series in (data.loss.series[0], data.lr.series[0], data.grad_norm.series[0]):
        assert len(series.x) <= 500 and series.x[0] == 1.0 and series.x[-1] == n
    assert max(data.loss.series[0].y) == 20.0


# -- rendering ------------------------------------------------------------------------------------
CASES = {
    "full": lambda: full_data(study_name="s", trial_number=0),
    "empty": lambda: build_run_data(make_run(status="running")),
    "single_epoch": lambda: build_run_data(make_run(), steps_frame((5.0,)), evals_frame((1,), (4.0,)),
                                           epochs_frame(1, gpu=True)),
    "nan": lambda: build_run_data(make_run(status="failed"), steps_frame((5.0, np.nan, np.nan)),
                                  evals_frame((2,), (np.nan,))),
    "no_validation": lambda: build_run_data(make_run(status="running"), steps_frame(), None,
                                            epochs_frame(1, val=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_run_dashboard_png(case):
    data = CASES[case]()
    buf = io.BytesIO()
    render_run_dashboard(data, buf)
    assert buf.getvalue().startswith(PNG_SIGNATURE)
    buf.seek(0)
    assert imread(buf, format="png").shape[:2] == (1500, 2700)     # 18 x 10 inches at 150 dpi


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_note_is_drawn(case):
    data = CASES[case]()
    texts = "\n".join(t.get_text() for ax in build_figure(data).axes for t in ax.texts)
    for panel in data.panels:
        for note in panel.notes:
            assert note in texts


def test_figure_labels_panels_and_units():
    fig = build_figure(full_data())
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Perplexity", "Learning rate",
                                                   "Gradient norm", "Epoch duration",
                                                   "Process memory (RSS) per epoch"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (nats)", "perplexity (exp of loss)",
                                                    "learning rate", "gradient norm (L2)",
                                                    "seconds", "MB"]
    assert "tiny" in fig.get_suptitle() and "batch 8x2" in fig.get_suptitle()


# -- comparison -------------------------------------------------------------------------------------
def test_build_comparison_sorts_best_first_and_notes_missing_validation():
    a = build_curve(make_run(1, "a"), evals_frame((2, 4), (4.0, 3.0)), None)
    b = build_curve(make_run(2, "b", best_val_loss=2.0), evals_frame((2,), (2.0,)), None)
    c = build_run_data(make_run(3, "c"), steps_frame())
    assert build_comparison([a, b, c]) == ComparisonData("Validation loss", (
        Curve(2, "run 2 b", (2.0,), (2.0,), 2.0),
        Curve(1, "run 1 a", (2.0, 4.0), (4.0, 3.0), 3.0)), ("run 3 c: no validation yet",))


@pytest.mark.parametrize("fmt, head", [("png", PNG_SIGNATURE), ("html", b"<!doctype html>")])
def test_render_comparison(fmt, head):
    buf = io.BytesIO()
    render_comparison([full_data(), full_data(run_id=2, name="other")], buf, fmt=fmt)
    assert buf.getvalue().startswith(head)


def test_render_comparison_of_nothing_says_so():
    fig = comparison_figure(build_comparison([]))
    assert "no run has validation results yet" in [t.get_text() for t in fig.axes[0].texts]


# -- CLI --------------------------------------------------------------------------------------------
class FakeDB:
    """The read half of expdb's API over the frames above."""

    def __init__(self, runs):
        self.runs_ = {r.id: r for r in runs}

    def run(self, run_id):
        if run_id not in self.runs_:
            raise LookupError(run_id)
        return self.runs_[run_id]

    def steps(self, run_id): return steps_frame()
    def evals(self, run_id): return evals_frame()
    def epochs(self, run_id): return epochs_frame()
    def checkpoints(self, run_id): return checkpoints_frame()
    def events(self, run_id): return events_frame()

    def study(self, name):
        rows = [r for r in self.runs_.values() if r.study_name == name]
        return pd.DataFrame(dict(id=[r.id for r in rows], trial_number=[r.trial_number for r in rows],
                                 status=[r.status for r in rows],
                                 best_val_loss=[r.best_val_loss for r in rows]))


@pytest.fixture
def fake_db(monkeypatch, tmp_path):
    runs = [make_run(i, f"r{i}", status=s, study_name="sweep", trial_number=i, best_val_loss=b)
            for i, s, b in ((1, "completed", 3.0), (2, "pruned", 2.0), (3, "failed", 1.0),
                            (4, "completed", np.nan))]
    db = FakeDB(runs)
    monkeypatch.setattr(cli, "open_db", lambda url: db)
    monkeypatch.chdir(tmp_path)
    return db


def test_cli_compares_runs_and_study_top_k(fake_db, tmp_path, monkeypatch):
    assert cli.main(["--runs", "1", "2", "--out", "c.html"]) == 0
    assert b"run 2 r2" in (tmp_path / "c.html").read_bytes()
    assert cli.study_top_runs(fake_db, "sweep", 10) == [2, 1, 4]     # failed left out, NaN last
    assert cli.study_top_runs(fake_db, "sweep", 1) == [2]
    assert cli.main(["--study", "sweep", "--top", "2"]) == 0
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("argv, message", [
    (["--run", "99"], r"^error: --run 99: no run with id 99 in experiments.db; list the runs"),
    (["--runs", "1", "98", "99"], r"^error: --runs 1 98 99: no run with id 98, 99 in"),
    (["--run", "1", "--out", "d.jpg"], r"^error: --out d.jpg: --run writes .png files, not .jpg"),
    (["--runs", "1", "--out", "c.svg"], r"^error: --out c.svg: .*\.png or \.html"),
    (["--run", "1", "--out", "no/such/dir/d.png"], r"^error: --out no/such/dir/d.png: directory"),
    (["--study", "nope"], r"^error: --study nope: no runs recorded for this study"),
    (["--study", "sweep", "--top", "0"], r"^error: --top 0: use a positive number"),
])
def test_cli_errors(fake_db, tmp_path, capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.match(message, err)
    assert list(tmp_path.iterdir()) == []                            # nothing written


def test_cli_missing_database(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--db", "missing.db", "--run", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --db missing.db: no such file;")
    assert list(tmp_path.iterdir()) == []


def test_write_run_dashboard(fake_db, tmp_path):
    out = dashboards.write_run_dashboard(fake_db, 1, tmp_path / "sub" / "dash.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert fetch_run_data(fake_db, 1) == full_data(name="r1", study_name="sweep", trial_number=1,
                                                   best_val_loss=3.0)


# -- integration: a run written through expdb's recorder, drawn by the CLI ----------------------------
def record_run(db, name, trial, losses, status="completed"):
    from trainer.recorder import RunInfo

    rec = db.recorder(study_name="sweep", trial_number=trial)
    run_id = rec.start_run(RunInfo(name=name, config=dict(CONFIG), dataset={}, tokenizer={},
                                   n_params=1000, device="cpu", precision="fp32", host="test"))
    for step, loss in enumerate(losses, start=1):
        rec.log_step(step, dict(loss=loss, lr=1e-3, grad_norm=0.5, epoch=0, tokens_per_s=1e3,
                                tokens_seen=step * 64))
        if step % 2 == 0:
            rec.log_eval(step, 0, dict(val_loss=loss + 0.1, val_ppl=math.exp(loss + 0.1)))
    rec.log_event("oom", 1, {"micro_batch": 8})
    rec.log_checkpoint("best.pt", "best", 2, losses[1] + 0.1, 10, "0" * 64)
    rec.log_epoch(0, dict(train_loss=float(np.nanmean(losses)), epoch_seconds=1.5,
                          mem_process_mb=300.0, step=len(losses)))
    rec.finish(status)
    return run_id


def test_cli_on_a_real_database(tmp_path, capsys, monkeypatch):
    expdb = pytest.importorskip("expdb")
    from trainer.recorder import RunInfo

    monkeypatch.chdir(tmp_path)
    with expdb.open(tmp_path / "exp.db") as db:
        a = record_run(db, "a", 0, [5.0, 4.0, float("nan"), 3.0])
        b = record_run(db, "b", 1, [5.0, 3.5, 3.0, 2.0], status="pruned")
        data = fetch_run_data(db, a)
        started = db.recorder().start_run(RunInfo(name="new", config={}, dataset={}, tokenizer={},
                                                  n_params=1, device="cpu", precision="fp32", host="h"))
        fresh = fetch_run_data(db, started)
    assert fresh.loss.notes == (NO_STEPS, NO_VALIDATION) and fresh.markers == ()
    assert data.loss.series[0].x == (1.0, 2.0, 4.0)
    assert "1 non-finite training loss value not drawn" in data.loss.notes
    assert data.markers == (Marker("oom", 1.0), Marker("best", 4.0))     # run.best_step
    assert data.memory.title == "Process memory (RSS) per epoch"
    assert data.title.study == "sweep" and data.title.trial == 0

    assert cli.main(["--db", "exp.db", "--run", str(a), "--out", "a.png"]) == 0
    assert capsys.readouterr().out == "wrote a.png\n"
    assert cli.main(["--db", "exp.db", "--runs", str(a), str(b), "--out", "c.html"]) == 0
    assert cli.main(["--db", "exp.db", "--study", "sweep", "--top", "1", "--out", "s.png"]) == 0
    for name in ("a.png", "s.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert b"run 2 b (trial 1)" in (tmp_path / "c.html").read_bytes()
    assert cli.main(["--db", "exp.db", "--run", "99", "--out", "x.png"]) == 2
    assert "--run 99: no run with id 99" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_spiky_gradient_norm_gets_a_log_axis_and_overflow_is_noted():
    calm = build_run_data(make_run(), steps_frame())
    spiky = steps_frame((5.0, 4.0, 3.0, 1000.0)).assign(grad_norm=[0.5, 0.4, 0.6, 400.0])
    data = build_run_data(make_run(), spiky, max_points=4)
    assert not calm.grad_norm.log_y and data.grad_norm.log_y
    assert data.perplexity.notes == (NO_VALIDATION, "1 non-finite perplexity value not drawn")
