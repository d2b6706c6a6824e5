"""Bits per byte and word perplexity in the dashboards: the run's panels and title, tables,
comparisons by bits per byte where tokenizers differ, the study report; and runs recorded before
they were measured (an upgraded schema-3 file: NULL columns) drawn without them, never failing."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

import dashboards
from dashboards import __main__ as cli
from dashboards.compare_data import build_comparison, choose_metric, fetch_comparison
from dashboards.compare_png import comparison_figure
from dashboards.live import progress
from dashboards.run_data import NO_STEPS, build_run_data, fetch_run_data
from dashboards.run_html import run_figure
from dashboards.run_png import build_figure
from dashboards.run_records import SecondAxis, Series
from dashboards.tables import fetch_table, to_csv

DATA = Path(__file__).parent / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(best_val_bpb=None, **kw):
    fields = dict(id=1, name="tiny", status="completed", study_name=None, trial_number=None,
                  config=dict(n_layer=2, lr=1e-3, tokenizer="bpe", vocab_size=512), n_params=1000,
                  precision="fp32", best_val_loss=3.0, best_step=4, best_val_bpb=best_val_bpb)
    return SimpleNamespace(**{**fields, **kw})


def evals(bpb=(2.0, 1.5), word_ppl=(400.0, 150.0)):
    return pd.DataFrame(dict(step=[2, 4], epoch=0, val_loss=[4.0, 3.0], val_ppl=np.exp([4.0, 3.0]),
                             val_bpb=list(bpb), val_word_ppl=list(word_ppl)))


# -- records --------------------------------------------------------------------------------------
def test_the_loss_panel_has_bits_per_byte_and_the_perplexity_panel_word_perplexity_on_the_right():
    data = build_run_data(run(best_val_bpb=1.5), evals=evals())
    bpb = data.loss.second_axis
    assert bpb.label == "bits per byte" and bpb.log is False
    assert bpb.series == (Series("val_bpb", "validation bits per byte", (2.0, 4.0), (2.0, 1.5)),)
    assert bpb.limits == pytest.approx((1.5 - 0.06, 2.0 + 0.06))          # 12 % of the range each side
    words = data.perplexity.second_axis
    assert words == SecondAxis("perplexity per word", (Series("val_word_ppl", "validation, per word",
                                                             (2.0, 4.0), (400.0, 150.0)),),
                               (150.0 / 1.3, 400.0 * 1.3), log=True)
    assert len(data.panels) == 6
    assert data.title.results == (("best val loss", "3"), ("bits per byte", "1.5"), ("word ppl", "150"))
    assert "best val loss 3, bits per byte 1.5, word ppl 150" in data.title.text.splitlines()[0]
    assert ("tokenizer", "bpe 512") in data.title.hparams
    assert progress(data) == "no step yet, val loss 3, 1.5 bits per byte"


def test_a_run_without_bits_per_byte_draws_as_before():
    """NULL in the database reads as NaN: no second axis, no series, no note of it, the loss alone in the title."""
    old = evals(bpb=(np.nan, np.nan), word_ppl=(np.nan, np.nan))
    for frame in (old, old.drop(columns=["val_bpb", "val_word_ppl"])):
        data = build_run_data(run(), evals=frame)
        assert data.loss.second_axis is None and data.perplexity.second_axis is None
        assert data.loss.notes == (NO_STEPS,) and data.title.results == (("best val loss", "3"),)
        assert data.validation_bpb is None and progress(data) == "no step yet, val loss 3"


def test_word_perplexity_only_where_the_text_had_words():
    data = build_run_data(run(best_val_bpb=1.5), evals=evals(word_ppl=(np.nan, np.nan)))
    assert data.loss.second_axis is not None and data.perplexity.second_axis is None
    assert [k for k, _ in data.title.results] == ["best val loss", "bits per byte"]


@pytest.mark.parametrize("with_bpb", [True, False])
def test_both_renderers_draw_the_second_axes(with_bpb):
    frame = evals() if with_bpb else evals(bpb=(np.nan,) * 2, word_ppl=(np.nan,) * 2)
    data = build_run_data(run(best_val_bpb=1.5 if with_bpb else None), evals=frame)
    fig = build_figure(data)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert ("bits per byte" in labels, "perplexity per word" in labels) == (with_bpb, with_bpb)
    words_axis = next((ax for ax in fig.axes if ax.get_ylabel() == "perplexity per word"), None)
    assert words_axis is None or words_axis.get_yscale() == "log"
    names = {t.name for t in run_figure(data).data}
    assert ({"validation bits per byte", "validation, per word"} <= names) == with_bpb
    buf = io.BytesIO()
    dashboards.render_run_dashboard(data, buf)
    assert buf.getvalue().startswith(PNG_SIGNATURE)


# -- comparisons ----------------------------------------------------------------------------------
def runs_frame(tokenizers, best_loss, best_bpb):
    return pd.DataFrame(dict(id=[1, 2], name=["a", "b"], status="completed", study_name="s", trial_number=[0, 1],
                             best_val_loss=best_loss, best_val_bpb=best_bpb,
                             config=[dict(tokenizer="bpe", vocab_size=v, lr=1e-3) for v in tokenizers],
                             tokenizer=[{"kind": "bpe", "vocab_size": v} for v in tokenizers]))


def test_different_vocabularies_are_compared_in_bits_per_byte_by_default():
    # the smaller vocabulary has the lower loss per token but the higher bits per byte
    runs = runs_frame([300, 512], [3.8, 5.0], [3.8, 3.4])
    assert choose_metric(runs) == ("val_bpb", ())
    metric, notes = choose_metric(runs, "val_loss")
    assert metric == "val_loss" and "losses per token do not compare" in notes[0]
    assert choose_metric(runs_frame([512, 512], [3.8, 5.0], [3.8, 3.4])) == ("val_loss", ())
    old = choose_metric(runs_frame([300, 512], [3.8, 5.0], [np.nan, np.nan]))
    assert old[0] == "val_loss" and "none of them recorded bits per byte" in old[1][0]
    history = {i: (pd.DataFrame(dict(step=[10, 20], val_loss=[l + 1, l], val_bpb=[b + 1, b])), None)
               for i, l, b in ((1, 3.8, 3.8), (2, 5.0, 3.4))}
    data = build_comparison(runs, history, "Study s", metric="val_bpb")
    assert [c.run_id for c in data.curves] == [2, 1] and [c.best for c in data.curves] == [3.4, 3.8]
    assert data.curves[0].y == (4.4, 3.4)
    assert [t.best for t in data.trials] == [3.8, 3.4]                 # bits per byte, not perplexity
    assert data.params[0].name == "vocab_size" and data.params[0].objective == (3.8, 3.4)
    fig = comparison_figure(data)
    assert [ax.get_title() for ax in fig.axes][:2] == ["Validation bits per byte of the best 2 runs",
                                                       "Best bits per byte per run"]
    assert fig.axes[2].get_ylabel() == "best validation bits per byte"


# -- real databases -------------------------------------------------------------------------------
@pytest.fixture
def v3_copy(tmp_path):
    """A schema-3 file (no bits per byte), upgraded in place on opening."""
    path = tmp_path / "old.db"
    shutil.copy(DATA / "expdb_v3.db", path)
    return path


@pytest.fixture
def v4_copy(tmp_path):
    path = tmp_path / "new.db"
    shutil.copy(DATA / "expdb_v4.db", path)
    return path


def test_an_upgraded_old_file_renders_every_view_with_blanks(v3_copy, tmp_path, monkeypatch):
    expdb = pytest.importorskip("expdb")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--db", str(v3_copy), "--run", "1", "--out", "run.png", "--table", "run.csv"]) == 0
    assert imread(tmp_path / "run.png").shape[2] in (3, 4)          # a PNG matplotlib can read back
    rows = list(pd.read_csv(tmp_path / "run.csv").itertuples())
    assert rows and all(math.isnan(r.val_bpb) for r in rows)
    assert cli.main(["--db", str(v3_copy), "--study", "v1-study", "--out", "cmp.html", "--report", "r.html",
                     "--table", "t.json"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["runs"][0]["best_val_bpb"] is None
    assert "objective: val_loss" in (tmp_path / "r.html").read_text()
    assert cli.main(["--db", str(v3_copy), "--runs", "1", "2", "--metric", "val_bpb", "--out", "b.png"]) == 0
    with expdb.open(v3_copy) as db:
        data = fetch_comparison(db, run_ids=[1, 2], metric="val_bpb")
        assert data.curves == () and all(n.endswith("no bits per byte recorded") for n in data.notes)
        assert fetch_run_data(db, 1).loss.second_axis is None


def test_a_new_file_shows_bits_per_byte_in_every_view(v4_copy, tmp_path, monkeypatch):
    expdb = pytest.importorskip("expdb")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--db", str(v4_copy), "--run", "1", "--out", "run.html"]) == 0
    page = (tmp_path / "run.html").read_text()
    assert "validation bits per byte" in page and "perplexity per word" in page
    with expdb.open(v4_copy) as db:
        data = fetch_run_data(db, 1)
        run = db.run(1)
        assert data.validation_bpb.y[-1] == pytest.approx(db.evals(1)["val_bpb"].iloc[-1])
        assert dict(data.title.results)["bits per byte"] == f"{run.best_val_bpb:.4g}"
        table = fetch_table(db, run_id=1)
        assert dict(table.header)["best_val_bpb"] == pytest.approx(run.best_val_bpb)
        assert "val_bpb" in to_csv(table).decode().splitlines()[0]
        cmp = fetch_comparison(db, run_ids=[1, 2], metric="val_bpb")
        assert [c.best for c in cmp.curves] == sorted(db.run(i).best_val_bpb for i in (1, 2))


def test_metric_is_refused_where_nothing_is_compared(v4_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--db", str(v4_copy), "--run", "1", "--metric", "val_bpb"]) == 2
    assert "--metric val_bpb: picks what a comparison draws" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [v4_copy]
