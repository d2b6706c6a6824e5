"""Long runs and real browsers (slow: run with --run-slow).

A 1,000,000-step and a 100,000-step run written through expdb's recorder (with a crash and a
resume), rendered to PNG and HTML; the HTML pages opened in headless Chromium, which must
draw every plot and log nothing to the console. Speed is measured by
``python -m bench dashboards``, not asserted here.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess

import pytest
from matplotlib.image import imread

from bench.synthetic import curves, write_study, write_synthetic_run
from dashboards import render_run
from dashboards.run_data import fetch_run_data
from dashboards.run_png import render_run_dashboard
from dashboards.run_records import Marker

pytestmark = pytest.mark.slow
expdb = pytest.importorskip("expdb")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def long_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    runs = {}
    for n, resume_at in ((100_000, 40_000), (1_000_000, 400_000)):
        db = expdb.open(root / f"run{n}.db")
        runs[n] = (db, write_synthetic_run(db, n, resume_at=resume_at, name=f"synthetic-{n}"))
    yield root, runs
    for db, _ in runs.values():
        db.close()


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_long_run_keeps_spikes_resume_and_range(long_dbs, n):
    _, runs = long_dbs
    db, run_id = runs[n]
    data = fetch_run_data(db, run_id)
    raw = curves(n)
    train = data.loss.series[0]
    assert len(train.x) <= 2000 and (train.x[0], train.x[-1]) == (1.0, float(n))
    assert max(train.y) == pytest.approx(raw["loss"].max())              # the spikes survive
    assert min(train.y) == pytest.approx(raw["loss"].min())
    assert max(data.grad_norm.series[0].y) == pytest.approx(raw["grad_norm"].max())
    assert Marker("resume", n * 0.4) in data.markers
    assert data.title.status == "completed" and data.memory.title == "GPU memory per epoch"
    buf = io.BytesIO()
    render_run_dashboard(data, buf)
    buf.seek(0)
    assert imread(buf, format="png").shape[:2] == (1500, 2700)


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_long_run_html_stays_small(long_dbs, n):
    root, runs = long_dbs
    db, run_id = runs[n]
    out = render_run(fetch_run_data(db, run_id), root / f"run{n}.html")
    assert out.stat().st_size < 3_000_000
    assert out.stat().st_size < 400_000                                     # ~170 kB today


def chromium_check(page):
    """Open ``page`` headless; return (dom, console lines)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE:" in line]
    return done.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_html_pages_open_in_headless_chromium_without_errors(long_dbs, tmp_path):
    from dashboards import write_comparison, write_study_report

    root, runs = long_dbs
    db, run_id = runs[100_000]
    pages = {"run": (render_run(fetch_run_data(db, run_id), tmp_path / "run.html"), 1)}
    with expdb.open(tmp_path / "study.db") as sdb:
        write_study(sdb, "mini", 4, pruned=(1,))
        pages["compare"] = (write_comparison(sdb, tmp_path / "compare.html", study="mini"), 1)
        pages["report"] = (write_study_report(sdb.url, "mini", tmp_path / "report.html"), 4)
    for name, (page, plots) in pages.items():
        dom, console = chromium_check(page)
        assert console == [], f"{name}: {console}"
        assert len(re.findall(r'class="plot-container plotly"', dom)) == plots, name
    (tmp_path / "plotly.min.js").unlink()              # the check can fail: without plotly.js
    _, console = chromium_check(pages["run"][0])
    assert any("Plotly is not defined" in line for line in console)
