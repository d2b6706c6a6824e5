"""What the notebook's cells call (notebooks/train_small_gpt.ipynb): settings checked once,
then the same commands as the shell's, run in the kernel, with pictures and tables inline.

    import studies.notebook as nb
    settings = nb.Settings.from_cell(MODE="quick", TASK="study", TRIALS=10, TIME_BUDGET="8h30m", ...)
    nb.environment(settings); nb.prepare_data(settings); nb.memory_check(settings)
    outcome = nb.train(settings)          # python -m studies.search / python -m trainer, in this kernel
    nb.results(settings); nb.export_and_generate(settings, "def "); nb.hand_off(settings)

No logic lives in the notebook: a setting is checked here, a run is the command line's own
``main``, and a bad setting stops its cell with one short message (``NotebookError``), not a
traceback through five frames. The notebook's interrupt button is Ctrl-C: the run writes
its emergency checkpoint and ends ``interrupted``, and the next cell works.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.environment import Environment, detect

TASKS = ("run", "study")
DATA_SOURCES = ("offline", "wikitext-103", "files", "upload")
SETTINGS_FILE = "notebook-settings.json"     # the trainer settings the cell chose, as --config


class NotebookError(Exception):
    """A setting or a step that cannot go on; shown as its message alone (IPython's hook)."""

    def _render_traceback_(self) -> list[str]:     # IPython shows these lines instead of a traceback
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {line}" for line in str(self).splitlines()]


@dataclass(frozen=True)
class Settings:
    mode: str
    task: str
    trials: int
    time_budget: str
    data: str
    data_files: tuple[str, ...]
    out: Path
    continue_from: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    env: Environment | None = None

    @classmethod
    def from_cell(cls, *, MODE: str, TASK: str, TRIALS: int, TIME_BUDGET: str, DATA: str, DATA_FILES: str = "",
                  OUT: str = "", CONTINUE_FROM: str = "", DRIVE_FOLDER: str = "",
                  OVERRIDES: dict | None = None) -> "Settings":
        """The parameters cell's values, every problem listed at once (setting, value, fix)."""
        env = detect(DRIVE_FOLDER or None)
        settings = cls(MODE, TASK, int(TRIALS), TIME_BUDGET.strip(), DATA, _paths(DATA_FILES),
                       Path(OUT) if OUT else env.working_dir, _paths(CONTINUE_FROM), dict(OVERRIDES or {}), env)
        if problems := settings.problems():
            raise NotebookError("\n".join(problems))
        return settings

    def problems(self) -> list[str]:
        from trainer.clock import parse_duration
        from trainer.presets import PRESETS

        found = []
        if self.mode not in PRESETS:
            found.append(f"MODE {self.mode!r}: unknown mode; choose one of {', '.join(PRESETS)}")
        if self.task not in TASKS:
            found.append(f"TASK {self.task!r}: choose 'run' (one training run) or 'study' (an Optuna search)")
        if self.trials < 1:
            found.append(f"TRIALS {self.trials}: use 1 or more trials")
        if self.time_budget:
            try:
                parse_duration(self.time_budget)
            except ValueError as exc:
                found.append(f"TIME_BUDGET {self.time_budget!r}: {exc}")
        if self.data not in DATA_SOURCES:
            found.append(f"DATA {self.data!r}: choose one of {', '.join(DATA_SOURCES)}")
        if self.data == "files" and not self.data_files:
            found.append("DATA 'files' with DATA_FILES empty: name the .txt/.jsonl/.parquet files (comma-separated)")
        found += [f"DATA_FILES {f!r}: no such file; check the path (Kaggle: under /kaggle/input/...)"
                  for f in self.data_files if not Path(f).is_file()]
        found += [f"CONTINUE_FROM {d!r}: no such folder; give the previous session's session-pack/ folder"
                  for d in self.continue_from if not Path(d).is_dir()]
        if self.out.exists() and not self.out.is_dir():
            found.append(f"OUT {str(self.out)!r}: is a file; give a folder for the outputs")
        return found

    # -- what the commands are given -----------------------------------------------------
    @property
    def db(self) -> Path:
        return self.out / "experiments.db"

    @property
    def study_name(self) -> str:
        return self.mode

    def trainer_config(self) -> dict[str, Any]:
        values = {"progress": True, **self.overrides}
        if self.data == "wikitext-103":
            values.update(dataset="wikitext", dataset_config="wikitext-103-raw-v1")
        elif self.data in ("files", "upload"):
            values.update(data_files=list(self.data_files))
        return values

    def argv(self) -> list[str]:
        """The command line of this session: studies.search's flags, or the trainer's."""
        common = ["--preset", self.mode, "--db", str(self.db), "--config", str(self.out / SETTINGS_FILE)]
        if self.time_budget:
            common += ["--time-budget", self.time_budget]
        if self.continue_from:
            common += ["--continue-from", *self.continue_from]
        if self.task == "study":
            return [*common, "--trials", str(self.trials), "--out", str(self.out / "runs")]
        return [*common, "--out", str(self.out / "runs" / "run")]


def _paths(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


# -- the sections ----------------------------------------------------------------------------
def environment(settings: Settings) -> Environment:
    print(settings.env.describe(settings.out))
    return settings.env


def prepare_data(settings: Settings):
    """Tokenizer and token cache for the chosen data (the run reuses them); what the corpus is."""
    from trainer.data import prepare_data as prepare

    cfg = _config(settings)
    data = _quietly_fail(lambda: prepare(cfg, log=print))
    ids = data.dataset_identity
    print(f"data: {ids.get('source')}: train {ids['train']['documents']:,} documents, "
          f"{len(data.train):,} tokens; validation {len(data.val):,} tokens; vocabulary {data.vocab_size:,}")
    return data


def memory_check(settings: Settings) -> str:
    """The model's size and what training it needs, against the memory this machine has."""
    from trainer.memory import training_memory_estimate

    line = training_memory_estimate(_config(settings), settings.env)
    print(line)
    return line


def train(settings: Settings, watch_every: float = 30.0) -> int:
    """The session's run or study, in this kernel, with the newest run's dashboard refreshed
    below the cell every ``watch_every`` seconds. Returns the command's exit status."""
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / SETTINGS_FILE).write_text(json.dumps(settings.trainer_config(), indent=1))
    if settings.task == "study":
        from studies.search import main
    else:
        from trainer.__main__ import main
    with _watching(settings.db, watch_every):
        status = _quietly_fail(lambda: main(settings.argv()))
    print(f"exit status {status}" + {0: " (done)", 75: " (stopped for the time budget: continue next session)",
                                     130: " (interrupted: continue with the same settings)"}.get(status, ""))
    return status


def results(settings: Settings):
    """The runs as pandas tables, the best run's six-panel dashboard inline, the study's pages."""
    import expdb
    from IPython.display import HTML, Image, display

    with expdb.open(str(settings.db), create=False) as db:
        runs = db.runs()
        display(runs[[c for c in ("id", "name", "status", "trial_number", "best_val_loss", "best_val_bpb",
                                  "n_steps", "duration_s") if c in runs]])
        best = runs.dropna(subset=["best_val_loss"]).sort_values("best_val_loss").head(1)
        if best.empty:
            print("no run has a validation loss yet")
            return runs
        from dashboards import write_run_dashboard
        png = write_run_dashboard(db, int(best["id"].iloc[0]), settings.out / "best_dashboard.png")
        display(Image(filename=str(png), width=1200))
        if settings.task == "study":
            display(db.study(settings.study_name))
            from dashboards import write_study_report
            page = write_study_report(str(settings.db), settings.study_name, settings.out / "report.html")
            display(HTML(f"study report: <code>{page}</code> (open it from the output folder)"))
    return runs


def export_and_generate(settings: Settings, prompt: str, max_new_tokens: int = 40) -> str | None:
    """The best completed run's final_model/, loaded with transformers, continuing ``prompt``
    (None, with a note, in a session that ended before any run completed: the hand-off follows)."""
    import expdb
    from trainer.generate import generate

    with expdb.open(str(settings.db), create=False) as db:
        runs = db.runs()
    done = runs[runs["status"] == "completed"].dropna(subset=["best_val_loss"]).sort_values("best_val_loss")
    # out_dir is recorded relative to the database's folder (or absolute, in older databases)
    folders = [settings.db.parent / d for d in done.get("out_dir", []) if d]
    models = [f / "final_model" for f in folders if (f / "final_model").is_dir()]
    if not models:
        print("no completed run has a final_model/ yet (this session ended first); the next session continues "
              "the study, and its notebook shows the model here")
        return None
    text = generate(str(models[0]), prompt, max_new_tokens=max_new_tokens, temperature=0)[0]
    print(f"model: {models[0]}\n--- {text}")
    return text


def hand_off(settings: Settings) -> dict[str, Any] | None:
    """The session pack (written by the study when its time ran out, or now) and what to do next."""
    from trainer.pack import PACK_DIR, read_pack

    folder = settings.out / PACK_DIR
    if settings.task == "study" and not (folder / "pack.json").is_file():
        from studies.pack import main as pack
        _quietly_fail(lambda: pack(["--study", settings.study_name, "--db", str(settings.db),
                                    "--out", str(settings.out / "runs")]))
    elif settings.task == "run":
        from trainer.pack import main as pack
        _quietly_fail(lambda: pack(["--out", str(settings.out / "runs" / "run"), "--db", str(settings.db),
                                    "--workdir", str(settings.out)]))
    meta = read_pack(folder)
    if meta is None:
        raise NotebookError(f"no session pack in {folder}; see the messages above")
    size = sum(f["bytes"] for f in meta.get("files", {}).values()) if isinstance(meta.get("files"), dict) else None
    print(f"session pack: {folder}" + (f" ({size / 1e6:.1f} MB)" if size else ""))
    print("to continue: save this session's output (Kaggle: Save Version; Colab: keep OUT on Drive), add it as "
          "an input of the next session and set CONTINUE_FROM to its session-pack/ folder "
          "(on Kaggle it is found under /kaggle/input by itself)")
    print(f"next session's command: {meta.get('next_command')}")
    return meta


def upload_files(folder: str | Path = "uploads") -> list[str]:
    """Colab's upload dialog: the chosen files, saved under ``folder``; their paths."""
    try:
        from google.colab import files
    except ImportError:
        raise NotebookError("DATA 'upload' needs Colab's upload dialog; elsewhere put the files in a folder "
                            "and use DATA 'files' with DATA_FILES") from None
    Path(folder).mkdir(parents=True, exist_ok=True)
    saved = []
    for name, content in files.upload().items():
        (Path(folder) / Path(name).name).write_bytes(content)
        saved.append(str(Path(folder) / Path(name).name))
    return saved


def mount_drive() -> Path:
    """Colab: mount Google Drive, so that OUT (and the pack) survive the session."""
    try:
        from google.colab import drive
    except ImportError:
        raise NotebookError("DRIVE_FOLDER is for Colab (Google Drive); elsewhere leave it empty and set OUT") from None
    drive.mount("/content/drive")
    return Path("/content/drive/MyDrive")


# -- helpers ---------------------------------------------------------------------------------
def _config(settings: Settings):
    from trainer.config import TrainConfig
    from trainer.presets import preset_values

    values = {**preset_values(settings.mode), **settings.trainer_config()}
    try:
        return TrainConfig.from_dict(values).check()
    except Exception as exc:   # noqa: BLE001 - a ConfigError lists every problem; show them, not frames
        raise NotebookError(str(exc)) from None


def _quietly_fail(call):
    """Run a command's code; its exit 2 (bad input, message already printed) becomes one line."""
    try:
        return call()
    except SystemExit as stop:
        if stop.code in (0, None):
            return 0
        raise NotebookError(f"stopped with exit status {stop.code}: see the message above") from None
    except Exception as exc:
        from trainer.errors import TrainerError
        if isinstance(exc, TrainerError):
            raise NotebookError(str(exc)) from None
        raise


@contextlib.contextmanager
def _watching(db_path: Path, every: float):
    """Refresh the newest run's dashboard under the running cell from a thread (plots are drawn
    with matplotlib's Figure, no pyplot, so a second thread may render)."""
    try:
        from IPython.display import Image, display
    except ImportError:
        yield
        return
    stop = threading.Event()
    handle = display(display_id=True) if every > 0 else None

    def refresh() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):      # no run yet, or a busy database: try again later
                handle.update(Image(data=_newest_dashboard(db_path), format="png", width=1200))

    thread = threading.Thread(target=refresh, name="notebook-dashboard", daemon=True)
    if handle is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()


def _newest_dashboard(db_path: Path) -> bytes:
    import expdb
    from dashboards.run_data import fetch_run_data
    from dashboards.run_png import render_run_dashboard

    with expdb.open(str(db_path), create=False) as db:
        runs = db.runs()
        data = fetch_run_data(db, int(runs["id"].max()))
    buf = io.BytesIO()
    render_run_dashboard(data, buf)
    return buf.getvalue()
