"""Measure a run dashboard's render time and HTML size against drawing every point.

    python -m dashboards.synthetic --db long.db --steps 1000000
    python -m dashboards.benchmark --db long.db --run 1 [--repeat 3] [--out-dir bench-out]

"ours": read through expdb (``db.step_series`` where it exists), build the records (min/max
reduction), draw the six panels to a 150-dpi PNG; the HTML page with plotly.min.js beside it.
"naive": every step row read (``db.steps``), every point drawn (no reduction), and a plotly page
with plotly.js inline and the points as JSON lists (what ``fig.write_html`` gives by default).
Times are medians of ``--repeat`` runs, in seconds, imports excluded: wall time (``_s``) and
process CPU time (``_cpu_s``, what a busy shared machine does not inflate).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


CPU_TIMES: dict[str, float] = {}     # the process CPU time of the same calls (median)


def median_time(fn: Callable[[], Any], repeat: int, name: str = "") -> float:
    """Median wall time of ``repeat`` calls; the median CPU time goes to CPU_TIMES[name].

    On a shared machine the wall time includes waiting for a core; the CPU time does not,
    and for this single-threaded work it is what the wall time is on an idle machine.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    CPU_TIMES[name] = statistics.median(cpus)
    return statistics.median(walls)


def ours_png(db: Any, run_id: int) -> bytes:
    from dashboards.data import fetch_run_data
    from dashboards.training import render_run_dashboard

    buf = io.BytesIO()
    render_run_dashboard(fetch_run_data(db, run_id), buf)
    return buf.getvalue()


def naive_data(db: Any, run_id: int) -> Any:
    from dashboards.data import build_run_data

    return build_run_data(db.run(run_id), db.steps(run_id), db.evals(run_id), db.epochs(run_id),
                          db.checkpoints(run_id), db.events(run_id), max_points=0)


def naive_png(db: Any, run_id: int) -> bytes:
    from dashboards.training import render_run_dashboard

    buf = io.BytesIO()
    render_run_dashboard(naive_data(db, run_id), buf)
    return buf.getvalue()


def naive_html(db: Any, run_id: int) -> bytes:
    """Every point as JSON lists, plotly.js inline: fig.write_html's defaults."""
    from dashboards.run_html import run_figure

    fig = run_figure(naive_data(db, run_id))
    for trace in fig.data:                       # lists, as a figure built from lists stores them
        if trace.x is not None and len(trace.x) > 2:
            trace.x, trace.y = list(map(float, trace.x)), list(map(float, trace.y))
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")


def measure(db: Any, run_id: int, repeat: int, out_dir: Path) -> dict[str, float]:
    from dashboards.data import fetch_run_data
    from dashboards.run_html import render_run_html

    out_dir.mkdir(parents=True, exist_ok=True)
    ours_png(db, run_id)                         # warm caches (fonts, imports) before timing
    results = {"ours_png_s": median_time(lambda: ours_png(db, run_id), repeat, "ours_png_cpu_s"),
               "naive_png_s": median_time(lambda: naive_png(db, run_id), repeat, "naive_png_cpu_s")}
    (out_dir / "ours.png").write_bytes(ours_png(db, run_id))
    (out_dir / "naive.png").write_bytes(naive_png(db, run_id))
    results["ours_html_s"] = median_time(
        lambda: render_run_html(fetch_run_data(db, run_id), out_dir / "ours.html"), repeat,
        "ours_html_cpu_s")
    results.update(CPU_TIMES)
    render_run_html(fetch_run_data(db, run_id), out_dir / "ours_inline.html", plotlyjs="inline")
    (out_dir / "naive.html").write_bytes(naive_html(db, run_id))
    for name in ("ours.png", "naive.png", "ours.html", "ours_inline.html", "naive.html",
                 "plotly.min.js"):
        results[f"{name}_bytes"] = (out_dir / name).stat().st_size
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="Experiment database with the run.")
    p.add_argument("--run", type=int, default=1, help="Run id (default 1).")
    p.add_argument("--repeat", type=int, default=3, help="Timed repetitions (median; default 3).")
    p.add_argument("--out-dir", default="bench-out", help="Where the rendered files go.")
    args = p.parse_args(argv)
    from dashboards.source import open_existing

    db = open_existing(args.db)
    results = measure(db, args.run, args.repeat, Path(args.out_dir))
    n_steps = len(db.steps(args.run)) if results else 0
    print(f"run {args.run}: {n_steps} step rows; medians of {args.repeat}")
    for key, value in results.items():
        print(f"  {key:28s} {value:.3f}" if key.endswith("_s") else f"  {key:28s} {value:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
