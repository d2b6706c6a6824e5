"""Render a ``ReportData`` as one HTML page: Optuna's plots beside the table of trials.

On a wide screen the four plots (2 x 2) sit left of the table; on a narrow one the table
follows them. plotly.js is loaded once for the page (see ``dashboards.output``).
"""
from __future__ import annotations

import html
import math
import os
from typing import IO, Any, Callable

from dashboards.output import html_page, write_html
from dashboards.report_data import OBJECTIVES, Plot, ReportData, TrialRow

CSS = """<style>
body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } .summary { color: #555; margin-bottom: 12px; }
.layout { display: grid; grid-template-columns: 1fr; gap: 16px; }
@media (min-width: 1700px) { .layout { grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); } }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
@media (max-width: 1100px) { .plots { grid-template-columns: minmax(0, 1fr); } }
.plot { border: 1px solid #ddd; border-radius: 6px; padding: 6px; min-height: 200px;
        min-width: 0; overflow: hidden; }
.plot h2, .table h2 { font-size: 15px; margin: 2px 6px 6px; }
.note { color: #777; font-style: italic; padding: 60px 12px; text-align: center; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; } td.text { text-align: left; white-space: normal; }
tr.best { background: #fff6d5; font-weight: 600; } tr.pruned td.state { color: #e06c00; }
tr.fail td.state { color: #c62828; } tr.running td.state { color: #2e7d32; }
.table { overflow-x: auto; min-width: 0; }
</style>
"""
# plots drawn while the page was still being parsed took the width they had then: redo them
RESIZE = "<script>window.addEventListener('load', () => window.dispatchEvent(new Event('resize')));</script>"


def render_report(data: ReportData, study: Any, out: str | os.PathLike | IO[bytes],
                  plotlyjs: str = "directory") -> None:
    parts = [f"<h1>Study {html.escape(data.study)}</h1>", summary(data), '<div class="layout">',
             '<div class="plots">', *(plot_div(p, study) for p in data.plots), "</div>",
             trials_table(data), "</div>", RESIZE]
    write_html(out, html_page(f"Study {data.study}", parts, plotlyjs, head=CSS), plotlyjs)


def summary(data: ReportData) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data.counts.items()))
    objective = OBJECTIVES.get(data.objective, data.objective)
    text = (f"{len(data.trials)} trials ({counts or 'none'}); objective: {data.objective} ({objective}), "
            f"{data.direction}d")
    best = next((t for t in data.trials if t.number == data.best), None)
    if best is not None:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params)
        text += (f". Best: trial {best.number} (run {best.run_id}), value {_fmt(best.value)}, "
                 f"val loss {_fmt(best.best_val_loss)}, perplexity {_fmt(best.best_ppl)}, "
                 f"bits per byte {_fmt(best.best_val_bpb)}; {params}")
    return f'<div class="summary">{html.escape(text)}</div>'


def plot_div(plot: Plot, study: Any) -> str:
    head = f'<div class="plot" id="{plot.name}"><h2>{html.escape(plot.title)}</h2>'
    note = plot.note
    if note is None:
        try:
            fig = optuna_figure(plot.name)(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as e:   # optuna refuses these data
            note = f"not available: {e}"
        else:
            fig.update_layout(title=None, margin=dict(l=50, r=20, t=20, b=50), height=420)
            body = fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                               config={"responsive": True})
            return f"{head}{body}</div>"
    return f'{head}<div class="note">{html.escape(note)}</div></div>'


def optuna_figure(name: str) -> Callable[[Any], Any]:
    import optuna.visualization as vis

    if name == "param_importances":
        from optuna.importance import FanovaImportanceEvaluator

        return lambda study: vis.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0))   # seeded: the same page twice
    return getattr(vis, f"plot_{name}")


def trials_table(data: ReportData) -> str:
    ranked = {"val_loss": "best val loss", "val_bpb": "bits per byte"}.get(data.objective)
    measures = [f"{m} (objective)" if m == ranked else m for m in ("best val loss", "best perplexity", "bits per byte")]
    head = ["trial", "run", "state", "run status", *measures, "duration (s)", *data.param_names, "note"]
    rows = "\n".join(trial_tr(t, data) for t in data.trials)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (f'<div class="table" id="trials"><h2>Trials (run = expdb run id; '
            f'python -m dashboards --run ID for its dashboard)</h2><table>\n<thead><tr>{header}'
            f"</tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>")


def trial_tr(t: TrialRow, data: ReportData) -> str:
    params = dict(t.params)
    cells = [str(t.number), "" if t.run_id is None else str(t.run_id)]
    cells += [t.state, t.run_status or "", _fmt(t.best_val_loss), _fmt(t.best_ppl), _fmt(t.best_val_bpb),
              _fmt(t.duration_s, 1)]
    cells += [_fmt(params.get(name)) for name in data.param_names]
    tds = "".join(f'<td{_cls(i)}>{html.escape(c)}</td>' for i, c in enumerate(cells))
    tds += f'<td class="text">{html.escape(t.note)}</td>'
    cls = f"{t.state}{' best' if t.number == data.best else ''}"
    return f'<tr class="{cls}" id="trial-{t.number}">{tds}</tr>'


def _cls(i: int) -> str:
    return ' class="state"' if i == 2 else ""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits == 1 else f"{value:.{digits}g}"
    return str(value)
