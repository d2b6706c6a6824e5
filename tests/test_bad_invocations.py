"""Bad invocations of every command line: each is refused before anything is written.

Each case runs in a subprocess whose working folder holds a few traps (a text file named
like a database, an empty data file, another program's SQLite file, a database of a newer
expdb, ...). Every one must exit 2 with one line per problem naming the flag, print no
traceback, and leave the folder exactly as it was: no token cache, no database, no lock
file, no output folder. None of them trains (the data-file cases read a few bytes of data and
stop at its checks), so they run in parallel and fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = shutil.which("nvidia-smi") is None

# (command line after `python -m`, text the error must contain (the flag), extra environment)
TRAINER = [
    ("trainer --db notes.txt", "--db 'notes.txt': ", {}),
    ("trainer --db other.db", "--db 'other.db': ", {}),
    ("trainer --db newer.db", "--db 'newer.db': ", {}),
    ("trainer --db a_dir", "--db 'a_dir': ", {}),
    ("trainer --db notes.txt/x.db", "--db 'notes.txt/x.db': ", {}),
    ("trainer --data-files empty.txt", "--data-files 'empty.txt'", {}),
    ("trainer --data-files missing.txt", "--data-files 'missing.txt'", {}),
    ("trainer --data-files data.csv", "--data-files 'data.csv'", {}),
    ("trainer --time-budget 12x", "--time-budget '12x'", {}),
    ("trainer --deadline 25:99", "--deadline '25:99'", {}),
    ("trainer --resume a_dir", "--resume 'a_dir'", {}),
    ("trainer --resume missing_dir", "--resume 'missing_dir'", {}),
    ("trainer --resume-from missing_dir --resume auto", "--resume-from 'missing_dir'", {}),
    ("trainer --out notes.txt", "--out 'notes.txt'", {}),
    ("trainer --cache-dir notes.txt", "--cache-dir 'notes.txt'", {}),
    ("trainer --config notes.txt", "--config 'notes.txt'", {}),
    ("trainer --n-embd 30", "--n-embd 30", {}),
    ("trainer --micro-batch lots", "--micro-batch", {}),
    ("trainer --early-stop-patience -1", "--early-stop-patience -1", {}),
    ("trainer --early-stop-min-delta -0.5", "--early-stop-min-delta -0.5", {}),
    ("trainer --gradient-checkpointing maybe", "--gradient-checkpointing 'maybe'", {}),
    ("trainer --arch mamba", "--arch 'mamba': choose one of gpt2, llama", {}),
    ("trainer --no-such-flag", "--no-such-flag", {}),
    ("trainer --text-column=", "--text-column ''", {}),
    ("trainer", "TRAINER_INJECT_OOM='x'", {"TRAINER_INJECT_OOM": "x"}),
    ("trainer", "TRAINER_SIMULATED_STEP_S='fast'", {"TRAINER_SIMULATED_STEP_S": "fast"}),
    # A limit that leaves no time: refused up front, not a run row stopped at step 0 (exit 75).
    ("trainer --deadline 2020-01-01T00:00", "--deadline '2020-01-01T00:00': that time has passed", {}),
    ("trainer --deadline 2020-01-01T00:00+00:00", "--deadline '2020-01-01T00:00+00:00'", {}),
    ("trainer --config past.yaml", "--deadline '2020-01-01T00:00': that time has passed", {}),
    ("trainer --time-budget 0s", "--time-budget '0s'", {}),
    # Another program's database (tables, none of ours or Optuna's): refused unless --db-shared.
    ("trainer --db app.db", "--db 'app.db': ", {}),
    ("trainer --db app.db --db-shared", "TRAINER_INJECT_OOM='x'", {"TRAINER_INJECT_OOM": "x"}),
    # Every data-file check before the first write to the cache (.cache/trainer/datasets included).
    ("trainer --data-files binary.txt", "--data-files 'binary.txt': is not UTF-8 text", {}),
    ("trainer --data-files broken.jsonl", "--data-files 'broken.jsonl': line 2 is not valid JSON", {}),
    ("trainer --data-files nocolumn.jsonl", "--text-column 'text': --data-files 'nocolumn.jsonl'", {}),
    ("trainer --data-files tiny.txt --subset 1 --val-fraction 0.2 --block-size 1024",
     "--data-files 'tiny.txt': the training split has", {}),
    ("trainer --data-files tiny.txt --subset 1 --val-fraction 0.2 --block-size 8 --micro-batch 1",
     "--data-files 'tiny.txt': the validation split has 6 tokens", {}),
    *([("trainer --device cuda", "--device 'cuda'", {}),
       ("trainer --precision fp16", "--precision 'fp16'", {})] if NO_GPU else []),
]
STUDIES = [
    ("studies.search --db notes.txt", "--db 'notes.txt': ", {}),
    ("studies.search --db other.db", "--db 'other.db': ", {}),
    ("studies.search --db newer.db", "--db 'newer.db': ", {}),
    ("studies.search --storage notes.txt", "--storage 'notes.txt'", {}),
    ("studies.search --storage sqlite:///notes.txt", "--storage 'sqlite:///notes.txt'", {}),
    ("studies.search --out notes.txt", "--out 'notes.txt'", {}),
    ("studies.search --trials 0", "--trials 0", {}),
    ("studies.search --study-name=", "--study-name ''", {}),
    ("studies.search --study-name a/b", "--study-name 'a/b'", {}),
    ("studies.search --devices cuda:99", "--devices 'cuda:99'", {}),
    ("studies.search --storage postgresql+psycopg://nohost.invalid/db", "--storage 'postgresql+psycopg:", {}),
    ("studies.search --continue-from missing_dir", "--continue-from 'missing_dir'", {}),
    ("studies.search --continue-from a_dir", "--continue-from 'a_dir'", {}),
    ("studies.search --max-disk-gb 0", "--max-disk-gb 0", {}),
    ("studies.search --keep-best-trials 0", "--keep-best-trials 0", {}),
    ("studies.search --time-budget 5x", "--time-budget", {}),
    ("studies.search --space notes.txt", "--space 'notes.txt'", {}),
    ("studies.search --config empty.txt --space missing.yaml", "--space 'missing.yaml'", {}),
    ("studies.search", "TRAINER_SIMULATED_STEP_S='-1'", {"TRAINER_SIMULATED_STEP_S": "-1"}),
    ("studies.search --config past.yaml", "--deadline '2020-01-01T00:00': that time has passed", {}),
    ("studies.search --time-budget 0s", "--time-budget", {}),
    ("studies.search --db app.db", "--db 'app.db': ", {}),
    ("studies.search --db app.db --db-shared", "TRAINER_SIMULATED_STEP_S='-1'", {"TRAINER_SIMULATED_STEP_S": "-1"}),
    ("studies.search --config broken.yaml", "--data-files 'broken.jsonl': line 2 is not valid JSON", {}),
    ("studies.report --study s --db notes.txt", "--db 'notes.txt': ", {}),
    ("studies.report --study s --db missing.db", "--db 'missing.db': ", {}),
    ("studies.report --study s --db other.db", "--db 'other.db': ", {}),
    ("studies.report --study s --db empty.txt", "--db 'empty.txt': ", {}),
    ("studies.report --study s --db good.db", "--study 's'", {}),
    ("studies.report --study s --db good.db --out notes.txt", "--out 'notes.txt'", {}),
    ("studies.report --study s --db good.db --top 0", "--top 0", {}),
    ("studies.report --study s --storage postgresql+psycopg://nohost.invalid/db", "--storage 'postgresql", {}),
]
EXPDB = [
    ("expdb --db notes.txt runs", "--db 'notes.txt': ", {}),
    ("expdb --db missing.db studies", "--db 'missing.db': ", {}),
    ("expdb --db newer.db show 1", "--db 'newer.db': ", {}),
    ("expdb --db other.db check", "--db 'other.db': ", {}),
    ("expdb --db empty.txt gc", "--db 'empty.txt': ", {}),
    ("expdb --db good.db show 7", "RUN 7: ", {}),
    ("expdb --db good.db export 1 --format csv --out a_dir", "--out 'a_dir'", {}),
    ("expdb --db good.db export 1 --format csv --out missing_dir/x.csv", "--out 'missing_dir/x.csv'", {}),
    ("expdb --db good.db export 1 --format xml", "--format", {}),
    ("expdb merge notes.txt --into new.db", "merge source 'notes.txt': ", {}),
    ("expdb merge good.db --into notes.txt", "--into 'notes.txt': ", {}),
]
DASHBOARDS = [
    ("dashboards --db notes.txt --run 1", "--db notes.txt: ", {}),
    ("dashboards --db missing.db --run 1", "--db missing.db: ", {}),
    ("dashboards --db other.db --run 1", "--db other.db: ", {}),
    ("dashboards --db good.db --run 7", "--run 7: ", {}),
    ("dashboards --db good.db --run 1 --out d.jpg", "--out d.jpg: ", {}),
    ("dashboards --db good.db --run 1 --out a_dir.png", "--out a_dir.png: ", {}),
    ("dashboards --db good.db --run 1 --out missing_dir/d.png", "--out missing_dir/d.png: ", {}),
    ("dashboards --db good.db --run 1 --watch 0", "--watch 0", {}),
    ("dashboards --db good.db --run 1 --report r.html", "--report r.html: ", {}),
]
TOOLS = [
    ("trainer.export json a_dir --out x.json", "CHECKPOINT_DIR 'a_dir'", {}),
    ("trainer.export json missing_dir --out x.json", "CHECKPOINT_DIR 'missing_dir'", {}),
    ("trainer.export json a_dir --out a_dir", "--out 'a_dir'", {}),
    ("trainer.export json a_dir --out missing_dir/x.json", "--out 'missing_dir/x.json'", {}),
    ("trainer.export import notes.txt --out ckpt", "JSON_FILE 'notes.txt'", {}),
    ("trainer.export import notes.txt --out a_dir", "--out 'a_dir'", {}),
    ("trainer.export import missing.json --out ckpt", "JSON_FILE 'missing.json'", {}),
    ("trainer.generate notes.txt", "MODEL_DIR 'notes.txt'", {}),
    ("trainer.generate a_dir --max-new-tokens 0", "--max-new-tokens 0", {}),
    ("trainer.generate a_dir --top-p 2", "--top-p 2", {}),
    ("trainer.lr_find", "--out", {}),
    ("trainer.lr_find --out lrf --min-lr 0", "--min-lr 0.0", {}),
    ("trainer.lr_find --out lrf --max-lr 1e-9", "--max-lr 1e-09", {}),
    ("trainer.lr_find --out lrf --steps 2", "--steps 2", {}),
    ("trainer.lr_find --out notes.txt", "--out 'notes.txt'", {}),
    ("trainer.lr_find --out lrf --db notes.txt", "--db 'notes.txt': ", {}),
    ("trainer.lr_find --out lrf --early-stop-patience -1", "--early-stop-patience -1", {}),
    ("trainer.lr_find --out lrf --deadline 2020-01-01T00:00", "--deadline '2020-01-01T00:00'", {}),
]
CASES = TRAINER + STUDIES + EXPDB + DASHBOARDS + TOOLS


def make_traps(folder: Path) -> None:
    """The working folder every invocation starts in."""
    (folder / "notes.txt").write_text("my notes, not a database\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "data.csv").write_text("text\nhello\n")
    (folder / "a_dir").mkdir()
    (folder / "a_dir.png").mkdir()
    with sqlite3.connect(folder / "other.db") as conn:          # another program's database
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    with sqlite3.connect(folder / "app.db") as conn:            # another program's, no table name like ours
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    (folder / "past.yaml").write_text('deadline: "2020-01-01T00:00"\n')
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 8)    # a binary file named .txt
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n{"text": "fine too"}\n')
    (folder / "nocolumn.jsonl").write_text("".join(f'{{"body": "document {i}"}}\n' for i in range(30)))
    (folder / "broken.yaml").write_text("data_files: [broken.jsonl]\n")
    # 20 paragraphs "a": exactly 2 tokens each (one byte, EOS) with any byte-level BPE; with
    # --val-fraction 0.2 the hash puts paragraphs 1, 8 and 17 in validation: 6 tokens, 34 for training.
    (folder / "tiny.txt").write_text("\n\n".join(["a"] * 20))
    with sqlite3.connect(folder / "newer.db") as conn:          # written by a newer expdb
        conn.execute("CREATE TABLE expdb_schema_version (id INTEGER PRIMARY KEY, version INTEGER, applied_at TEXT)")
        conn.execute("INSERT INTO expdb_schema_version (version, applied_at) VALUES (99, '2030-01-01')")
    import expdb
    from trainer.recorder import RunInfo

    with expdb.open(folder / "good.db") as db:                  # one finished run, id 1
        rec = db.recorder()
        rec.start_run(RunInfo(name="r", config={}, dataset={}, tokenizer={}, n_params=1, device="cpu",
                              precision="fp32", host="test"))
        rec.finish("completed", None)


def tree(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its size, modification time and content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns, digest)
    return found


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, tuple]:
    """Every case run once, each in its own copy of the folder of traps: (result, tree before, after)."""
    root = tmp_path_factory.mktemp("bad-invocations")
    template = root / "template"
    template.mkdir()
    make_traps(template)
    jobs = []
    for i, (command, _, env) in enumerate(CASES):
        workdir = root / f"case-{i:02d}"
        shutil.copytree(template, workdir, copy_function=shutil.copy2)
        jobs.append({"cwd": str(workdir), "argv": command.split(), "env": env,
                     "stdout": str(root / f"case-{i:02d}.out"), "stderr": str(root / f"case-{i:02d}.err")})
    before = {i: tree(Path(job["cwd"])) for i, job in enumerate(jobs)}
    codes = run_forked(jobs)
    return {i: (subprocess.CompletedProcess(job["argv"], codes[i], Path(job["stdout"]).read_text(),
                                            Path(job["stderr"]).read_text()), before[i], tree(Path(job["cwd"])))
            for i, job in enumerate(jobs)}


def run_forked(jobs: list[dict]) -> list[int]:
    """Run ``python -m ARGV`` for every job; their exit codes.

    One launcher process imports the heavy third-party libraries once (torch alone takes a
    second or more) and forks a child per job, which then runs the command as ``python -m``
    does: the project's own modules are imported afresh in each child, in the command's order.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _launch(jobs: list[dict], parallel: int) -> list[int]:
    import numpy, optuna, pandas, sqlalchemy, torch, yaml  # noqa: F401,E401 - third-party only: see run_forked

    codes = [0] * len(jobs)
    running: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for i, job in enumerate(jobs):
        if len(running) >= parallel:
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        pid = os.fork()
        if pid == 0:
            _child(job)
        running[pid] = i
    while running:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


def _child(job: dict) -> None:
    """Become ``python -m ARGV`` in the job's folder, then end as the interpreter would; never returns."""
    import atexit
    import gc

    code = 1
    try:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update(job["env"])
        sys.path[0] = job["cwd"]                    # python -m puts the working folder first
        sys.argv = list(job["argv"])
        code = _run_module(job["argv"][0])
        gc.collect()                  # close what the command left open (SQLite removes its -wal and -shm)
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_module(name: str) -> int:
    import runpy
    import traceback

    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()                       # what the interpreter prints for an uncaught error
        return 1
    return 0


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}{' ' + next(iter(c[2])) if c[2] else ''}"
                                                          for c in CASES])
def test_a_bad_invocation_is_refused_before_anything_is_written(outcomes, case):
    command, flag_text, _ = CASES[case]
    result, before, after = outcomes[case]
    shown = f"python -m {command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    assert flag_text in result.stderr, shown
    assert after == before, shown


def test_every_command_line_is_walked():
    modules = {command.split()[0] for command, _, _ in CASES}
    assert modules == {"trainer", "studies.search", "studies.report", "expdb", "dashboards", "trainer.export",
                       "trainer.generate", "trainer.lr_find"}


def test_db_shared_lets_another_programs_file_through_and_nothing_else(outcomes):
    """With --db-shared the file of another program passes the database check (the case still
    stops, on the other problem it was given, so nothing is written either way)."""
    for command in ("trainer --db app.db --db-shared", "studies.search --db app.db --db-shared"):
        case = next(i for i, c in enumerate(CASES) if c[0] == command)
        result = outcomes[case][0]
        assert result.returncode == 2 and "--db 'app.db'" not in result.stderr, result.stderr


def test_which_databases_a_writer_takes(tmp_path):
    """Refused: tables of another program and none of ours. Taken: a new path, an empty SQLite
    file, an Optuna study's file (a study shares it with Optuna by design), expdb's own, and
    another program's file when the user says --db-shared."""
    import optuna

    import expdb

    with sqlite3.connect(tmp_path / "app.db") as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    sqlite3.connect(tmp_path / "empty.db").close()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    expdb.open(tmp_path / "ours.db").close()
    with pytest.raises(expdb.ExpdbError, match=r"app\.db holds another program's tables \(customers\) .*--db-shared"):
        expdb.check_database(tmp_path / "app.db", create=True, write=True)
    for name in ("new.db", "empty.db", "optuna.db", "ours.db"):
        expdb.check_database(tmp_path / name, create=True, write=True)
    expdb.check_database(tmp_path / "app.db", create=True, write=True, shared=True)
    expdb.check_database(tmp_path / "app.db", create=True, write=False)     # a reader or a merge: its own rules
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "empty.db", "optuna.db", "ours.db"]


if __name__ == "__main__":     # the launcher of run_forked: jobs on stdin, exit codes on stdout
    print(json.dumps(_launch(json.loads(sys.stdin.read()), parallel=2 * (os.cpu_count() or 1))))
