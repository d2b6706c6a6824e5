"""Run dashboard: records by equality, reduce_minmax properties, PNG and HTML rendered into memory,
and runs written through expdb's recorder (a resumed one among them) drawn from a real SQLite file."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

import dashboards
from dashboards.run_data import (GPU_UTIL_CPU, GPU_UTIL_MISSING, NO_EPOCHS, NO_STEPS, NO_VALIDATION,
                                 build_run_data, fetch_run_data, mid_epoch_steps)
from dashboards.run_html import render_run_html, run_figure
from dashboards.run_png import build_figure, padded, render_run_dashboard
from dashboards.run_records import Marker, Panel, SecondAxis, Series, Title
from dashboards.series import reduce_minmax

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, lr=0.001, micro_batch=8,
              grad_accum=2, grad_clip=1.0, precision="auto")


# -- a run as the DataFrames expdb returns (inputs of the pure builder) --------------------------
def make_run(run_id=1, name="tiny", status="completed", best_step=None, **kw):
    fields = dict(id=run_id, name=name, status=status, status_reason=None, study_name=None,
                  trial_number=None, config=dict(CONFIG), n_params=123_456, precision="fp32",
                  best_val_loss=None, best_step=best_step)
    return SimpleNamespace(**{**fields, **kw})


def steps_frame(loss=(5.0, 4.0, 3.0, 2.5), start=1):
    step = np.arange(start, start + len(loss))
    return pd.DataFrame(dict(run_id=1, step=step, epoch=0, loss=list(loss), lr=1e-3 * step,
                             grad_norm=0.5 * step, tokens_per_s=1e4, tokens_seen=step * 256))


def evals_frame(steps=(2, 4), val=(4.5, 3.0)):
    return pd.DataFrame(dict(run_id=1, step=list(steps), epoch=0, val_loss=list(val),
                             val_ppl=np.exp(val)))


def epochs_frame(n=2, gpu=False, val=True, seconds=None, util=None):
    gpu_mb = [1000.0 + e for e in range(n)] if gpu else [np.nan] * n
    return pd.DataFrame(dict(gpu_util_pct=list(util) if util else np.nan,
        run_id=1, epoch=list(range(n)), step=[2 * (e + 1) for e in range(n)],
        train_loss=[4.0 - e for e in range(n)], val_loss=[4.2 - e for e in range(n)] if val else np.nan,
        val_ppl=np.nan, lr=1e-3, grad_norm=0.5,
        epoch_seconds=list(seconds) if seconds else [10.0 + e for e in range(n)],
        tokens_per_s=1e4, mem_process_mb=[500.0 + e for e in range(n)], mem_gpu_allocated_mb=gpu_mb,
        mem_gpu_reserved_mb=gpu_mb, mem_gpu_peak_mb=gpu_mb))


def events_frame(rows=(("resume", 3), ("oom", 2), ("signal", 4))):
    return pd.DataFrame(dict(id=range(len(rows)), run_id=1, kind=[k for k, _ in rows],
                             step=[s for _, s in rows], detail=[{}] * len(rows)))


def checkpoints_frame(rows=(("periodic", 2, 4.5), ("best", 4, 3.0), ("final", 4, 3.0))):
    return pd.DataFrame(dict(id=range(len(rows)), run_id=1, path="p", kind=[r[0] for r in rows],
                             step=[r[1] for r in rows], val_loss=[r[2] for r in rows]))


def full_data(**run_kw):
    return build_run_data(make_run(**run_kw), steps_frame(), evals_frame(), epochs_frame(),
                          checkpoints_frame(), events_frame())


def empty(columns=()):
    return pd.DataFrame(columns=list(columns))


# -- reduce_minmax ------------------------------------------------------------------------------
def test_reduce_minmax_leaves_short_series_alone():
    x, y = np.arange(5.0), np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    rx, ry = reduce_minmax(x, y, 10)
    assert rx.tolist() == x.tolist() and ry.tolist() == y.tolist()


@pytest.mark.parametrize("n, max_points", [(10, 4), (1001, 100), (100_000, 2000), (54_321, 777)])
def test_reduce_minmax_keeps_spikes_range_and_order(n, max_points):
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


def test_reduce_minmax_keeps_every_bucket_extreme():
    y = np.zeros(1000)
    y[::100] = np.arange(10) + 1.0                               # one bump per 100 points
    _, ry = reduce_minmax(np.arange(1000.0), y, 40)
    assert sorted(ry[ry > 0].tolist()) == list(np.arange(10) + 1.0)


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
    assert data.title.text.splitlines() == [
        "tiny  \u00b7  run 1  \u00b7  completed  \u00b7  study sweep, trial 3",
        "n_layer 2   n_embd 64   n_head 2   block_size 32   lr 0.001   batch 8x2   precision fp32   params 123k"]


def test_step_panels_records():
    data = full_data()
    steps = (1.0, 2.0, 3.0, 4.0)
    assert data.loss == Panel("Loss", "step", "loss (nats)", (
        Series("train_step", "train (per step)", steps, (5.0, 4.0, 3.0, 2.5)),
        Series("train_epoch", "train (epoch mean, mid-epoch)", (1.0, 3.0), (4.0, 3.0)),
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


def test_mid_epoch_steps():
    frame = pd.DataFrame(dict(epoch=[1, 0, 2], step=[200.0, 100.0, 250.0]))
    assert mid_epoch_steps(frame).tolist() == [150.0, 50.0, 225.0]
    assert mid_epoch_steps(None).tolist() == []


def test_epoch_panels_records():
    data = full_data()
    assert data.epoch_time == Panel("Epoch duration", "epoch", "seconds",
                                    (Series("epoch_seconds", "wall time", (0.0, 1.0), (10.0, 11.0)),),
                                    by_step=False, from_zero=True)
    assert data.memory == Panel("Process memory (RSS) per epoch", "epoch", "MB",
                                (Series("mem_process", "process RSS", (0.0, 1.0), (500.0, 501.0)),),
                                (GPU_UTIL_CPU,), by_step=False, from_zero=True)


@pytest.mark.parametrize("seconds, unit, shown", [((30.0, 119.0), "seconds", (30.0, 119.0)),
                                                   ((600.0, 3600.0), "minutes", (10.0, 60.0)),
                                                   ((7200.0, 9000.0), "hours", (2.0, 2.5))])
def test_epoch_duration_unit_follows_the_longest_epoch(seconds, unit, shown):
    panel = build_run_data(make_run(), epochs=epochs_frame(2, seconds=seconds)).epoch_time
    assert (panel.ylabel, panel.series[0].y) == (unit, shown)


def test_memory_panel_prefers_gpu_columns():
    data = build_run_data(make_run(), steps_frame(), evals_frame(), epochs_frame(gpu=True))
    assert data.memory.title == "GPU memory per epoch"
    assert [s.label for s in data.memory.series] == ["GPU allocated", "GPU reserved", "GPU peak"]
    assert data.memory.series[0].y == (1000.0, 1001.0)
    assert data.memory.second_axis is None and data.memory.notes == (GPU_UTIL_MISSING,)   # no NVML on that GPU


UTIL_AXIS = SecondAxis("GPU utilisation (%)", (Series("gpu_util", "GPU utilisation", (0.0, 1.0), (55.0, 80.0)),),
                       (0.0, 100.0))


def test_memory_panel_draws_gpu_utilisation_on_a_second_axis():
    data = build_run_data(make_run(), epochs=epochs_frame(gpu=True, util=(55.0, 80.0)))
    assert data.memory.second_axis == UTIL_AXIS and data.memory.notes == ()
    assert data.memory.series[2].y == (1000.0, 1001.0)       # memory stays on the left axis
    one_missing = build_run_data(make_run(), epochs=epochs_frame(gpu=True, util=(55.0, np.nan)))
    assert one_missing.memory.second_axis.series[0].x == (0.0,)   # an epoch without a sample is not drawn


def test_the_png_draws_utilisation_against_a_right_axis_of_0_to_100():
    fig = build_figure(build_run_data(make_run(), steps_frame(), evals_frame(),
                                      epochs_frame(gpu=True, util=(55.0, 80.0))))
    memory, twin = fig.axes[5], fig.axes[6]
    assert len(fig.axes) == 7 and twin.get_shared_x_axes().joined(memory, twin)
    assert (twin.get_ylabel(), twin.get_ylim()) == ("GPU utilisation (%)", (0.0, 100.0))
    assert twin.get_lines()[0].get_ydata().tolist() == [55.0, 80.0] and memory.get_ylabel() == "MB"
    assert [t.get_text() for t in twin.get_legend().get_texts()] == ["GPU allocated", "GPU reserved", "GPU peak",
                                                                      "GPU utilisation"]


def test_the_html_draws_utilisation_on_the_memory_panels_secondary_axis():
    fig = run_figure(build_run_data(make_run(), steps_frame(), evals_frame(),
                                    epochs_frame(gpu=True, util=(55.0, 80.0))))
    (util,) = [t for t in fig.data if t.name == "GPU utilisation"]
    (memory,) = {(t.xaxis, t.yaxis) for t in fig.data if t.name == "GPU peak"}
    assert util.xaxis == memory[0] and util.yaxis != memory[1] and list(util.y) == [55.0, 80.0]
    right = fig.layout[util.yaxis.replace("y", "yaxis")]
    assert (right.overlaying, right.side, tuple(right.range), right.title.text) == (
        memory[1], "right", (0.0, 100.0), "GPU utilisation (%)")


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
    reduced = build_run_data(make_run(), steps_frame((5.0, float("nan"), 3.0)), steps_reduced=True)
    assert "non-finite training loss values not drawn" in reduced.loss.notes    # no count: rows were reduced


def test_metrics_that_were_not_logged_are_noted_once():
    steps = steps_frame((5.0, 4.0, 3.0)).assign(grad_norm=np.nan, lr=[1e-3, np.nan, 1e-3])
    data = build_run_data(make_run(best_step=2), steps, events=events_frame((("resume", 2),)))
    assert data.grad_norm.notes == ("no finite gradient norm recorded",)
    assert data.lr.notes == ("1 missing or non-finite learning rate value not drawn",)
    fig = build_figure(data)
    assert fig.axes[3].get_lines() == [] and len(fig.axes[0].get_lines()) == 3   # no marker on an empty panel


def test_empty_run_has_a_note_on_every_panel():
    data = build_run_data(make_run(status="running"), empty(), empty(), empty(), empty(), empty())
    assert all(p.series == () for p in data.panels)                 # not even the clip line
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
    assert data.perplexity.series[0].label == "train, exp(mean loss over ~500 steps)"


def test_spiky_gradient_norm_gets_a_log_axis_and_overflow_is_noted():
    calm = build_run_data(make_run(), steps_frame())
    spiky = steps_frame((5.0, 4.0, 3.0, 1000.0)).assign(grad_norm=[0.5, 0.4, 0.6, 400.0])
    data = build_run_data(make_run(), spiky, max_points=4)
    assert not calm.grad_norm.log_y and data.grad_norm.log_y
    assert data.perplexity.notes == ("no validation (run completed)",
                                     "1 non-finite training perplexity value not drawn")


def test_a_finished_run_does_not_say_yet():
    data = build_run_data(make_run(status="pruned"), steps_frame())
    assert data.loss.notes == ("no validation (run pruned)",)
    assert data.epoch_time.notes == data.memory.notes == ("no epoch completed (run pruned)",)


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
    "gpu_utilisation": lambda: build_run_data(make_run(), steps_frame(), evals_frame(),
                                              epochs_frame(2, gpu=True, util=(55.0, 80.0))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_run_dashboard_png(case):
    buf = io.BytesIO()
    render_run_dashboard(CASES[case](), buf)
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_run_html(case):
    data = CASES[case]()
    buf = io.BytesIO()
    render_run_html(data, buf, plotlyjs="inline")
    page = buf.getvalue().decode()
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") >= 2
    notes = [a.text for a in run_figure(data).layout.annotations]
    for panel in data.panels:
        for note in panel.notes:
            assert any(note in text for text in notes)


def test_figure_labels_panels_and_units():
    fig = build_figure(full_data())
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Perplexity", "Learning rate",
                                                   "Gradient norm", "Epoch duration",
                                                   "Process memory (RSS) per epoch"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (nats)", "perplexity (exp of loss)",
                                                    "learning rate", "gradient norm (L2)",
                                                    "seconds", "MB"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["step"] * 4 + ["epoch"] * 2
    assert "tiny" in fig.get_suptitle() and "batch 8x2" in fig.get_suptitle()


def test_flat_memory_line_sits_inside_the_axes():
    """A real run's memory, equal in every epoch, drew on the top edge and was clipped."""
    epochs = epochs_frame(2).assign(mem_process_mb=[677.42, 677.45])
    ax = build_figure(build_run_data(make_run(), epochs=epochs)).axes[5]
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top >= 677.45 * 1.1
    assert padded(5.0, 5.0, from_zero=False) == (4.4, 5.6)        # a flat line gets room too
    assert padded(-1.0, 3.0, from_zero=True) == pytest.approx((-1.48, 3.48))


# -- real databases: runs written through expdb's recorder -----------------------------------------
def record_run(db, name, losses, status="completed", study=None, trial=None, gpu=False, util=None):
    from trainer.recorder import RunInfo

    rec = db.recorder(study_name=study, trial_number=trial)
    run_id = rec.start_run(RunInfo(name=name, config=dict(CONFIG), dataset={}, tokenizer={},
                                   n_params=1000, device="cpu", precision="fp32", host="test"))
    for step, loss in enumerate(losses, start=1):
        rec.log_step(step, dict(loss=loss, lr=1e-3, grad_norm=0.5, epoch=0, tokens_per_s=1e3,
                                tokens_seen=step * 64))
        if step % 2 == 0:
            rec.log_eval(step, 0, dict(val_loss=loss + 0.1, val_ppl=math.exp(loss + 0.1)))
    rec.log_event("oom", 1, {"micro_batch": 8})
    rec.log_checkpoint("best.pt", "best", 2, losses[1] + 0.1, 10, "0" * 64)
    memory = dict(mem_gpu_allocated_mb=900.0, mem_gpu_reserved_mb=1200.0, mem_gpu_peak_mb=1100.0) \
        if gpu else dict(mem_process_mb=300.0)
    if util is not None:        # as trainer.gpu_monitor.gpu_epoch_metrics sends it
        memory.update(gpu_util_pct=util, gpu_util_max_pct=100.0, gpu_mem_used_mb=1500.0, gpu_temp_c=70.0,
                      gpu_power_w=60.0)
    rec.log_epoch(0, dict(train_loss=float(np.nanmean(losses)), epoch_seconds=1.5,
                          step=len(losses), **memory))
    rec.finish(status)
    return run_id


@pytest.fixture
def db(tmp_path):
    expdb = pytest.importorskip("expdb")
    with expdb.open(tmp_path / "exp.db") as database:
        yield database


def test_a_recorded_run_read_back(db):
    from trainer.recorder import RunInfo

    a = record_run(db, "a", [5.0, 4.0, float("nan"), 3.0], study="sweep", trial=0)
    data = fetch_run_data(db, a)
    started = db.recorder().start_run(RunInfo(name="new", config={}, dataset={}, tokenizer={},
                                              n_params=1, device="cpu", precision="fp32", host="h"))
    fresh = fetch_run_data(db, started)
    assert fresh.loss.notes == (NO_STEPS, NO_VALIDATION) and fresh.markers == ()
    assert data.loss.series[0] == Series("train_step", "train (per step)", (1.0, 2.0, 4.0), (5.0, 4.0, 3.0))
    assert any("non-finite training loss" in n for n in data.loss.notes)
    assert data.markers == (Marker("oom", 1.0), Marker("best", 4.0))     # run.best_step
    assert data.memory.title == "Process memory (RSS) per epoch"
    assert data.title.study == "sweep" and data.title.trial == 0
    gpu = fetch_run_data(db, record_run(db, "g", [3.0, 2.0], gpu=True))
    assert gpu.memory.title == "GPU memory per epoch" and gpu.memory.series[2].y == (1100.0,)


def test_recorded_gpu_utilisation_is_drawn_and_a_cpu_run_says_why_it_is_not(db, tmp_path):
    gpu = record_run(db, "g", [3.0, 2.0], gpu=True, util=72.5)
    cpu = record_run(db, "c", [3.0, 2.0])
    drawn = fetch_run_data(db, gpu).memory
    assert drawn.second_axis.series == (Series("gpu_util", "GPU utilisation", (0.0,), (72.5,)),)
    assert fetch_run_data(db, cpu).memory.notes == (GPU_UTIL_CPU,)
    page = dashboards.write_run_dashboard(db, gpu, tmp_path / "gpu.html").read_text()
    assert '"name":"GPU utilisation"' in page and '"overlaying":"y6"' in page
    png = dashboards.write_run_dashboard(db, gpu, tmp_path / "gpu.png")
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def write_resumed_run(db, n_steps=60, resume_at=30):
    """A run that crashed after step resume_at + 10 and resumed from its checkpoint at resume_at."""
    from trainer.recorder import RunInfo

    info = dict(name="resumed", config=dict(CONFIG), dataset={}, tokenizer={}, n_params=1000,
                device="cpu", precision="fp32", host="test")
    rec = db.recorder()
    run_id = rec.start_run(RunInfo(**info))
    for step in range(1, resume_at + 11):
        rec.log_step(step, dict(loss=9.0 if step > resume_at else 6.0 - step / 20, lr=1e-3))
    rec.finish("interrupted", "killed")
    rec = db.recorder()
    rec.start_run(RunInfo(**info, extra={"run_id": run_id, "resume_step": resume_at}))
    for step in range(resume_at + 1, n_steps + 1):
        rec.log_step(step, dict(loss=6.0 - step / 20, lr=1e-3))
    rec.finish("completed")
    return run_id


def test_a_resumed_run_is_one_continuous_curve_with_the_resume_marked(db):
    run_id = write_resumed_run(db)
    data = fetch_run_data(db, run_id)
    train = data.loss.series[0]
    assert train.x == tuple(float(s) for s in range(1, 61))            # once each, no gap
    assert max(train.y) < 9.0                                          # the crashed session's rows are gone
    assert Marker("resume", 30.0) in data.markers
    assert data.title.status == "completed"


def test_write_run_dashboard_png_and_html(db, tmp_path):
    run_id = record_run(db, "a", [5.0, 4.0, 3.5, 3.0])
    png = dashboards.write_run_dashboard(db, run_id, tmp_path / "sub" / "dash.png")
    html = dashboards.write_run_dashboard(db, run_id, tmp_path / "sub" / "dash.html")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert '<script src="plotly.min.js"' in html.read_text()
    assert (tmp_path / "sub" / "plotly.min.js").stat().st_size > 1_000_000
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["dash.html", "dash.png", "plotly.min.js"]
