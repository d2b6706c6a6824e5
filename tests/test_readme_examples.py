"""The examples of README.md ("Look at the results") and docs/schema.md run, as written,
against a real experiments.db: two sessions of the Optuna study "quick" whose trials are
recorded runs, merged by the README's own command into one file.

Shell lines (``python -m expdb ...``) run through the command line's ``main`` (the
subprocess route is tested in test_expdb_cli); Python blocks run in one namespace per
document, in order, with the working directory where the files are.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from expdb.__main__ import main
from test_expdb_merge import study_session

ROOT = Path(__file__).parent.parent
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(document: Path, section: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of ``document``, or of one of its ## sections."""
    text = document.read_text(encoding="utf-8")
    if section is not None:
        start = text.index(f"\n## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end >= 0 else None]
    return FENCE.findall(text)


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for number, seed in ((1, 0), (2, 1)):
        folder = tmp_path / f"session-{number}"
        folder.mkdir()
        study_session(folder / "experiments.db", trials=2 + number, seed=seed, steps=60)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_shell(code: str, capsys: pytest.CaptureFixture) -> list[str]:
    """Run the ``python -m expdb`` lines of a shell block (other tools' lines are theirs to test)."""
    outputs = []
    for line in code.splitlines():
        argv = shlex.split(line.split("#")[0])
        if argv[:3] != ["python", "-m", "expdb"]:
            continue
        status = main(argv[3:])
        out, err = capsys.readouterr()
        assert status == 0, f"{command}\n{err}"
        outputs.append(out)
    return outputs


def run_python(code: str, namespace: dict, capsys: pytest.CaptureFixture) -> str:
    exec(compile(code, "<docs>", "exec"), namespace)    # noqa: S102 - the documentation's own code
    return capsys.readouterr().out


def test_readme_look_at_the_results(sessions: Path, capsys: pytest.CaptureFixture):
    found = blocks(ROOT / "README.md", "Look at the results")
    shell = [out for lang, code in found if lang == "bash" for out in run_shell(code, capsys)]
    assert len(shell) == 3, "the section shows merge, check and gc"     # the merge makes experiments.db
    assert "3 runs added" in shell[0] and "4 runs added" in shell[0]
    assert ": ok (0 checkpoints verified)" in shell[1]
    namespace: dict = {}
    outputs = [run_python(code, namespace, capsys) for lang, code in found if lang == "python"]
    assert len(outputs) == 3 and all(outputs)
    assert len(namespace["runs"]) == 7 and namespace["runs"]["n_steps"].tolist() == [60] * 7
    assert len(namespace["epochs"]) == 7
    assert "params_lr" in outputs[1] and "quick" in outputs[0]
    assert set(namespace["study"].best_params) == {"lr", "n_layer"}


def test_schema_doc_examples(sessions: Path, capsys: pytest.CaptureFixture):
    run_shell("python -m expdb merge session-1/experiments.db session-2/experiments.db --into experiments.db",
              capsys)
    found = blocks(ROOT / "docs" / "schema.md")
    python = [code for lang, code in found if lang == "python"]
    assert python, "docs/schema.md should show how to read the database"
    namespace: dict = {}
    for code in python:
        assert run_python(code, namespace, capsys)
    for lang, code in found:
        if lang == "bash":
            run_shell(code, capsys)
