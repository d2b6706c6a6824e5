"""Merging experiment databases of separate sessions, Optuna studies included."""
from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import optuna
import pandas as pd
import pytest

import expdb
from expdb.__main__ import main
from expdb.migrations import v1_uid
from test_expdb import make_info

DATA = Path(__file__).parent / "data"
TABLES = ("runs", "step_metrics", "step_rollups", "eval_metrics", "epoch_metrics", "checkpoints", "events",
          "studies", "trials", "trial_params", "trial_values", "trial_intermediate_values",
          "trial_user_attributes", "trial_system_attributes")


def study_session(path: Path, study_name: str = "quick", trials: int = 3, seed: int = 0,
                  direction: str = "minimize", finish: bool = True, steps: int = 40) -> None:
    """A session of a study as studies.trial runs it: each trial a recorded run, linked both ways."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed))
    with expdb.open(path) as db:
        for _ in range(trials):
            trial = study.ask()
            lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
            layers = trial.suggest_int("n_layer", 1, 4)
            rec = db.recorder(study_name, trial.number)
            run_id = rec.start_run(make_info(f"{study_name}/trial-{trial.number}", config={"lr": lr, "n_layer": layers},
                                             host=str(path)))
            trial.set_user_attr("run_id", run_id)
            for step in range(1, steps + 1):
                rec.log_step(step, {"loss": 3.0 - step / steps + lr, "lr": lr})
                if step % 20 == 0:
                    rec.log_eval(step, 0, {"val_loss": 2.0 - step / 100 + lr * 10})
                    trial.report(2.0 - step / 100 + lr * 10, step)
            rec.log_epoch(0, {"train_loss": 2.5, "step": steps})
            if not finish:
                rec.finish("interrupted", "time budget")
                continue
            rec.finish("completed")
            study.tell(trial, 2.0 - steps / 100 + lr * 10)
    storage.engine.dispose()


def counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


@pytest.fixture
def two_sessions(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "kaggle-1" / "experiments.db", tmp_path / "kaggle-2" / "experiments.db"
    a.parent.mkdir()
    b.parent.mkdir()
    study_session(a, trials=3, seed=0)
    study_session(a, study_name="other", trials=1, seed=5, direction="maximize")
    study_session(b, trials=2, seed=1)
    return a, b


def test_two_sessions_of_one_study_merge_into_one_and_read_with_pandas(two_sessions, tmp_path: Path):
    a, b = two_sessions
    before = (a.read_bytes(), b.read_bytes())
    into = tmp_path / "all.db"
    reports = expdb.merge([a, b], into=into)
    assert [len(r.runs_added) for r in reports] == [4, 2] and [r.trials_added for r in reports] == [4, 2]
    assert reports[0].studies_added == ["quick", "other"] and reports[1].studies_added == []
    assert (a.read_bytes(), b.read_bytes()) == before                 # sources untouched

    study = optuna.load_study(study_name="quick", storage=f"sqlite:///{into}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    with expdb.open(into) as db:
        runs = db.runs().set_index("id")
        for trial in study.trials:
            run = runs.loc[trial.user_attrs["run_id"]]           # the link points to the new run...
            assert (run["study_name"], run["trial_number"]) == ("quick", trial.number)   # ...and back
            assert run["config"]["lr"] == pytest.approx(trial.params["lr"])
        hosts = [runs.loc[t.user_attrs["run_id"], "host"] for t in study.trials]
        assert hosts == [str(a)] * 3 + [str(b)] * 2
        assert runs["uid"].is_unique and runs["n_steps"].tolist() == [40] * 6
        quick = db.study("quick")
        assert quick["trial_number"].tolist() == [0, 1, 2, 3, 4] and "params_lr" in quick
        assert db.events(runs.index[0])["kind"].tolist() == ["merged"]
    other = optuna.load_study(study_name="other", storage=f"sqlite:///{into}")
    assert other.direction == optuna.study.StudyDirection.MAXIMIZE and len(other.trials) == 1

    # The point of it all: one pandas query over both sessions, joined with Optuna's tables.
    df = pd.read_sql("""
        SELECT r.id, r.trial_number, r.host, s.best_val_loss, v.value AS optuna_value
        FROM run_summary s JOIN runs r ON r.id = s.id
        JOIN trials t ON t.number = r.trial_number
        JOIN studies st ON st.study_id = t.study_id AND st.study_name = r.study_name
        JOIN trial_values v ON v.trial_id = t.trial_id
        WHERE r.study_name = 'quick' ORDER BY r.trial_number""", f"sqlite:///{into}")
    assert len(df) == 5 and df["best_val_loss"].tolist() == pytest.approx(df["optuna_value"].tolist())
    assert df.groupby("host").size().to_dict() == {str(a): 3, str(b): 2}

    # Merging the same sources again adds nothing.
    first = counts(into)
    again = expdb.merge([a, b], into=into)
    assert [r.runs_skipped for r in again] == [4, 2] and [r.trials_added for r in again] == [0, 0]
    assert counts(into) == first
    # And a study continued after the merge numbers its trials after the merged ones.
    continued = optuna.load_study(study_name="quick", storage=f"sqlite:///{into}")
    continued.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=1)
    assert [t.number for t in continued.trials] == [0, 1, 2, 3, 4, 5]


def test_histories_are_copied_exactly(two_sessions, tmp_path: Path):
    a, _ = two_sessions
    into = tmp_path / "all.db"
    study_session(into, study_name="local", trials=1)       # the destination has runs of its own
    report = expdb.merge([a], into=into)[0]
    with expdb.open(a) as src, expdb.open(into) as dst:
        for old, new in zip(src.runs()["id"], report.runs_added):
            assert new != old
            for read in ("steps", "evals", "epochs"):
                mine, theirs = getattr(dst, read)(new), getattr(src, read)(old)
                pd.testing.assert_frame_equal(mine.drop(columns=["run_id"]), theirs.drop(columns=["run_id"]))
            pd.testing.assert_frame_equal(dst.step_series(new, max_points=20), src.step_series(old, max_points=20))


def test_a_run_continued_in_a_later_session_replaces_its_older_copy(tmp_path: Path):
    first = tmp_path / "session-1.db"
    study_session(first, trials=1, finish=False)           # stopped by the time budget: trial RUNNING
    second = tmp_path / "session-2.db"
    shutil.copy(first, second)                             # the next session carries the file on...
    with expdb.open(second) as db:                         # ...and finishes the run and the trial
        rec = db.recorder()
        rec.start_run(make_info("quick/trial-0", extra={"run_id": 1, "resume_step": 40}))
        for step in range(41, 61):
            rec.log_step(step, {"loss": 1.0})
        rec.finish("completed")
    storage = optuna.storages.RDBStorage(f"sqlite:///{second}")
    optuna.load_study(study_name="quick", storage=storage).tell(0, 0.75)
    storage.engine.dispose()

    into = tmp_path / "all.db"
    assert len(expdb.merge([first], into=into)[0].runs_added) == 1
    report = expdb.merge([second], into=into)[0]
    assert (report.runs_added, report.runs_updated, report.trials_updated) == ([], [1], 1)
    with expdb.open(into) as db:
        assert db.run(1).status == "completed" and len(db.steps(1)) == 60 and len(db.runs()) == 1
    merged = optuna.load_study(study_name="quick", storage=f"sqlite:///{into}")
    assert [(t.state.name, t.value, t.user_attrs["run_id"]) for t in merged.trials] == [("COMPLETE", 0.75, 1)]
    assert expdb.merge([first, second], into=into)[0].runs_skipped == 1   # older copies change nothing
    assert len(optuna.load_study(study_name="quick", storage=f"sqlite:///{into}").trials) == 1


def test_a_version_1_file_is_merged_without_being_changed(tmp_path: Path):
    source = tmp_path / "old-session.db"
    shutil.copy(DATA / "expdb_v1.db", source)
    before = source.read_bytes()
    into = tmp_path / "all.db"
    report = expdb.merge([source], into=into)[0]
    assert len(report.runs_added) == 3 and report.studies_added == ["v1-study"]
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["all.db", "old-session.db"]
    conn = sqlite3.connect(DATA / "expdb_v1.db")
    expected = [v1_uid(i, n, pd.Timestamp(s).to_pydatetime(), h)
                for i, n, s, h in conn.execute("SELECT id, name, started_at, host FROM runs ORDER BY id")]
    conn.close()
    with expdb.open(into) as db:
        assert db.runs()["uid"].tolist() == expected
        assert math.isnan(db.steps(3).set_index("step").loc[31, "loss"])
    assert expdb.merge([source], into=into)[0].runs_skipped == 3


def test_a_version_2_file_and_a_version_3_file_merge_with_their_gpu_columns(tmp_path: Path):
    """A v2 session (no GPU columns yet: NULL) and a v3 one (GPU columns filled) in one database."""
    old, new = tmp_path / "v2.db", tmp_path / "v3.db"
    shutil.copy(DATA / "expdb_v2.db", old)
    shutil.copy(DATA / "expdb_v3.db", new)
    before = old.read_bytes()
    into = tmp_path / "all.db"
    reports = expdb.merge([old, new], into=into)
    assert [len(r.runs_added) for r in reports] == [3, 3] and old.read_bytes() == before
    with expdb.open(into) as db:
        epochs = db.epochs()
    util = epochs.groupby("run_id")["gpu_util_pct"].apply(list).to_dict()
    assert all(math.isnan(u) for run in (1, 2, 3, 6) for u in util[run])     # v2's runs, and v3's CPU run
    assert util[4] == util[5] == [87.5, 87.5]
    assert epochs.set_index("run_id").loc[4, "gpu_mem_used_mb"].tolist() == [14_000.0, 14_000.0]


def test_a_version_3_file_and_a_version_4_file_merge_with_their_bpb_columns(tmp_path: Path):
    """The v3 session's copy is upgraded (bpb, word perplexity, mfu NULL: never measured); the
    v4 session's values come along, the run's best_val_bpb with them."""
    old, new = tmp_path / "v3.db", tmp_path / "v4.db"
    shutil.copy(DATA / "expdb_v3.db", old)
    shutil.copy(DATA / "expdb_v4.db", new)
    before = old.read_bytes()
    into = tmp_path / "all.db"
    assert [len(r.runs_added) for r in expdb.merge([old, new], into=into)] == [3, 3] and old.read_bytes() == before
    with expdb.open(into) as db:
        evals, epochs, runs = db.evals().set_index("run_id"), db.epochs().set_index("run_id"), db.runs().set_index("id")
    assert evals.loc[[1, 2, 3], ["val_bpb", "val_word_ppl"]].isna().all().all()
    assert epochs.loc[[1, 2, 3], ["val_bpb", "val_word_ppl", "mfu"]].isna().all().all()
    assert runs.loc[[1, 2, 3], "best_val_bpb"].isna().all()
    # make_expdb_file: 4 bytes a token, so bpb = loss / 4 / ln 2; its run 3 (here 6) had no words.
    bpb = evals.loc[[4, 5, 6], "val_loss"] / 4 / math.log(2)
    assert evals.loc[[4, 5, 6], "val_bpb"].tolist() == pytest.approx(bpb.tolist())
    assert runs.loc[[4, 5, 6], "best_val_bpb"].tolist() == \
        pytest.approx((runs.loc[[4, 5, 6], "best_val_loss"] / 4 / math.log(2)).tolist())
    assert evals.loc[[4, 5], "val_word_ppl"].notna().all() and evals.loc[6, "val_word_ppl"].isna().all()
    assert epochs.loc[[4, 5], "mfu"].tolist() == [0.25] * 4 and epochs.loc[6, "mfu"].isna().all()


def test_studies_that_cannot_be_combined_are_refused_untouched(tmp_path: Path):
    a, b, into = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "all.db"
    study_session(a, trials=1)
    study_session(b, trials=1, direction="maximize")
    expdb.merge([a], into=into)
    before = counts(into)
    with pytest.raises(expdb.MergeError, match="'quick' \\(MAXIMIZE here, MINIMIZE in the destination\\).*Rename"):
        expdb.merge([b], into=into)
    assert counts(into) == before
    with pytest.raises(expdb.MergeError, match="is the destination itself"):
        expdb.merge([into], into=into)


def test_runs_of_a_study_without_optuna_tables_keep_free_numbers(tmp_path: Path):
    a, b, into = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "all.db"
    for path in (a, b):
        with expdb.open(path) as db:
            for trial in (0, 1):
                db.recorder("manual", trial).start_run(make_info(f"{path.stem}-{trial}"))
    with expdb.open(b) as db:
        db.recorder("manual", 7).start_run(make_info("b-7"))
    expdb.merge([a, b], into=into)
    with expdb.open(into) as db:
        runs = db.runs()
    assert dict(zip(runs["name"], runs["trial_number"])) == {"a-0": 0, "a-1": 1, "b-0": 2, "b-1": 3, "b-7": 7}


def test_cli_merge(two_sessions, tmp_path: Path, capsys: pytest.CaptureFixture):
    a, b = two_sessions
    into = tmp_path / "all.db"
    assert main(["merge", str(a), str(b), "--into", str(into)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{a}: 4 runs added") and "new studies: quick, other" in out[0]
    assert out[1].startswith(f"{b}: 2 runs added")
    assert main(["--db", str(into), "merge", str(a)]) == 0          # --into defaults to --db
    assert "0 runs added, 0 updated, 4 already present" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "missing.db"), "--into", str(into)]) == 2
    assert "no experiment database" in capsys.readouterr().err


@pytest.mark.postgres
def test_merge_into_postgres(two_sessions, postgres_db_url: str):
    a, b = two_sessions
    reports = expdb.merge([a, b], into=postgres_db_url)
    assert [len(r.runs_added) for r in reports] == [4, 2]
    study = optuna.load_study(study_name="quick", storage=postgres_db_url)
    with expdb.open(postgres_db_url) as db:
        runs = db.runs().set_index("id")
        assert [runs.loc[t.user_attrs["run_id"], "trial_number"] for t in study.trials] == [0, 1, 2, 3, 4]
        assert db.checkpoints().empty and len(db.epochs()) == 6
    assert [r.runs_skipped for r in expdb.merge([a, b], into=postgres_db_url)] == [4, 2]


def test_merged_relative_paths_still_name_the_sources_files(tmp_path: Path):
    """A source's paths relative to its own folder are rebased: the merged rows name the
    source's files (an input read in place), and `check` of the destination passes."""
    from test_expdb_maintenance import write_checkpoint

    src_dir, dst_dir = tmp_path / "input", tmp_path / "work"
    saved = write_checkpoint(src_dir / "runs/r/checkpoints/step-1", 1)
    with expdb.open(src_dir / "experiments.db") as db:
        rec = db.recorder()
        rec.start_run(make_info(config={"out_dir": str(src_dir / "runs/r")}))
        rec.log_checkpoint(str(src_dir / "runs/r/checkpoints/step-1"), "periodic", 1, None, saved.size_bytes,
                           saved.sha256)
        rec.finish("interrupted")
        assert db.runs().out_dir[0] == "runs/r"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in src_dir.rglob("*"))
    expdb.merge([src_dir / "experiments.db"], into=dst_dir / "experiments.db")
    expdb.merge([src_dir / "experiments.db"], into=dst_dir / "experiments.db")      # idempotent
    with expdb.open(dst_dir / "experiments.db") as db:
        assert list(db.checkpoints().path) == [str(src_dir / "runs/r/checkpoints/step-1")]
        assert db.resolve_path(db.runs().out_dir[0]) == src_dir / "runs/r"
    assert main(["--db", str(dst_dir / "experiments.db"), "check"]) == 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in src_dir.rglob("*")) == before
