"""Live views: the dashboard re-rendered while a real recorder writes the run in another thread
(``--watch``), and the notebook helper publishing through a real IPython display publisher."""
from __future__ import annotations

import base64
import threading
import time

import pytest

from dashboards import __main__ as cli
from dashboards.live import watch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
expdb = pytest.importorskip("expdb")


def start_run(db, name="live"):
    from trainer.recorder import RunInfo

    rec = db.recorder(flush_interval_s=0.05)
    run_id = rec.start_run(RunInfo(name=name, config=dict(lr=1e-3), dataset={}, tokenizer={},
                                   n_params=1, device="cpu", precision="fp32", host="test"))
    return rec, run_id


def train(rec, steps, pause, finish=True, halfway=None):
    """What the trainer does to the recorder, slowly: steps, an eval every 10, an epoch, finish.
    ``halfway``: an Event to wait for after half the steps (a watcher has seen the run)."""
    for step in range(1, steps + 1):
        if halfway is not None and step == steps // 2:
            halfway.wait(timeout=60)
        rec.log_step(step, dict(loss=5.0 - step / steps, lr=1e-3, grad_norm=0.5))
        if step % 10 == 0:
            rec.log_eval(step, 0, dict(val_loss=5.1 - step / steps))
        time.sleep(pause)
    rec.log_epoch(0, dict(step=steps, train_loss=4.5, epoch_seconds=steps * pause, mem_process_mb=100.0))
    if finish:
        rec.finish("completed")


@pytest.fixture
def writer_db(tmp_path):
    with expdb.open(tmp_path / "exp.db") as db:
        yield db


@pytest.fixture
def reader_db(writer_db):
    from dashboards.source import open_existing

    with open_existing(writer_db.url) as db:      # a second connection pool, as another process has
        yield db


def test_watch_renders_while_the_run_trains_then_stops_when_it_ends(writer_db, reader_db, tmp_path):
    rec, run_id = start_run(writer_db)
    seen_running = threading.Event()
    trainer = threading.Thread(target=train, args=(rec, 60, 0.01, True, seen_running))
    trainer.start()
    lines: list[str] = []

    def log(line):
        lines.append(line)
        if " running, step " in line:        # rows already there, the run not finished
            seen_running.set()

    try:
        last = watch(reader_db, run_id, tmp_path / "live.png", every=0.1, iterations=200, log=log)
    finally:
        seen_running.set()
        trainer.join()
    assert any(" running, step " in line for line in lines[:-1])      # seen mid-run
    assert lines[-1] == f"run {run_id} is completed: wrote the final dashboard to {tmp_path / 'live.png'}"
    assert last.loss.series[0].x[-1] == 60.0 and last.validation.x[-1] == 60.0
    assert (tmp_path / "live.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


def test_cli_watch_is_bounded_by_iterations(writer_db, tmp_path, capsys, monkeypatch):
    rec, run_id = start_run(writer_db)
    train(rec, 5, 0, finish=False)
    monkeypatch.chdir(tmp_path)
    argv = ["--db", writer_db.url, "--run", str(run_id), "--out", "w.html", "--watch", "0.05",
            "--watch-iterations", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith("wrote w.html; next in 0.05 s")
    assert out[1].endswith("wrote w.html") and f"run {run_id} running" in out[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.db", "exp.db-shm", "exp.db-wal",
                                                          "plotly.min.js", "w.html"]
    assert '<meta http-equiv="refresh" content="1">' in (tmp_path / "w.html").read_text()
    rec.finish("interrupted")
    assert cli.main(argv) == 0                              # a finished run: final page, no reload
    assert capsys.readouterr().out.startswith(f"run {run_id} is interrupted: wrote the final")
    assert "http-equiv" not in (tmp_path / "w.html").read_text()


def test_notebook_helper_updates_one_output(writer_db, tmp_path):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from dashboards.notebook import live_dashboard

    InteractiveShell.instance()                 # what a notebook kernel has: a display publisher
    rec, run_id = start_run(writer_db)
    train(rec, 20, 0, finish=False)
    with capture_output() as captured:
        data = live_dashboard(writer_db.url, run_id, every=0.05, max_updates=3)
    outputs = captured.outputs
    assert len(outputs) == 3 and len({o.transient["display_id"] for o in outputs}) == 1
    assert [o.update for o in outputs] == [False, True, True]
    assert base64.b64decode(outputs[-1].data["image/png"]).startswith(PNG_SIGNATURE)
    assert data.title.status == "running"
    rec.finish("completed")
    with capture_output() as captured:          # a finished run: shown once, then it returns
        assert live_dashboard(writer_db, run_id, every=60).title.status == "completed"
    assert len(captured.outputs) == 1


def test_notebook_helper_rejects_a_bad_interval(writer_db):
    from dashboards.notebook import live_dashboard

    with pytest.raises(ValueError, match=r"^every=0: use a positive number of seconds"):
        live_dashboard(writer_db, 1, every=0)
