"""The Kaggle/Colab notebook: stored clean and valid, its settings checked like flags, and
executed for real (papermill over an ipykernel) across two sessions with a pack between them."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from studies.notebook import NotebookError, Settings

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "train_small_gpt.ipynb"
SECTIONS = ["Setup", "Environment and GPU", "Settings", "Data", "Memory check", "Train: one run or a study",
            "Results", "Export and generate", "Session hand-off"]


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebook_is_valid_stored_without_outputs_and_has_every_section():
    nb = notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    headings = [line[3:].split(". ", 1)[1] for c in nb.cells if c.cell_type == "markdown"
                for line in c.source.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS


def test_one_cell_tagged_parameters_holds_every_setting_as_a_colab_form():
    (cell,) = [c for c in notebook().cells if "parameters" in c.metadata.get("tags", [])]
    lines = cell.source.splitlines()
    assert all("#@param" in line for line in lines)
    names = [line.split("=")[0].strip() for line in lines]
    assert {"MODE", "TASK", "TRIALS", "TIME_BUDGET", "DATA", "OUT", "CONTINUE_FROM"} <= set(names)


def test_the_cells_call_the_packages_and_hold_no_training_logic():
    code = "\n".join(c.source for c in notebook().cells if c.cell_type == "code")
    lines = code.splitlines()
    assert not [line for line in lines if line.lstrip().startswith(("def ", "class ", "for ", "while "))]
    assert "import torch" not in code


GOOD = dict(MODE="quick", TASK="study", TRIALS=3, TIME_BUDGET="1h", DATA="offline")


def test_bad_settings_stop_at_the_cell_with_one_line_each(tmp_path):
    with pytest.raises(NotebookError) as bad:
        Settings.from_cell(**{**GOOD, "MODE": "huge", "TIME_BUDGET": "soon", "DATA": "files",
                              "DATA_FILES": str(tmp_path / "missing.txt"), "OUT": str(tmp_path)})
    lines = bad.value._render_traceback_()
    assert len(lines) == 3 and not (tmp_path / "experiments.db").exists()
    text = "\n".join(lines)
    assert "MODE 'huge': unknown mode" in text and "TIME_BUDGET 'soon'" in text and "missing.txt" in text


def tree_hash(top: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(top.rglob("*")):
        digest.update(str(path.relative_to(top)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def outputs(nb) -> str:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") if out.output_type == "stream" else
                         json.dumps(out.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


@pytest.mark.slow
def test_two_sessions_of_the_notebook_continue_one_study(tmp_path, data_cache, monkeypatch):
    import papermill
    import expdb

    overrides = {"subset": 0.02, "max_steps": 24, "eval_every": 8, "block_size": 32, "eval_batches": 2,
                 "cache_dir": str(data_cache), "progress": False}
    params = dict(MODE="quick", TASK="study", TRIALS=3, DATA="offline", OVERRIDES=overrides, WATCH_EVERY=0)
    monkeypatch.setenv("TRAINER_SIMULATED_STEP_S", "1")   # every step counts one second: no real-time race
    monkeypatch.chdir(tmp_path)
    first = papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "session1.ipynb"), kernel_name="python3",
                                       parameters={**params, "TIME_BUDGET": "15s", "OUT": str(tmp_path / "s1")},
                                       progress_bar=False, cwd=str(tmp_path))
    said = outputs(first)
    assert "running on a local machine" in said and "no GPU (CPU only)" in said
    assert "memory check:" in said and "session pack:" in said and "next session's command:" in said
    # the pack, moved elsewhere as the next session's read-only input
    pack = tmp_path / "input" / "session-pack"
    shutil.copytree(tmp_path / "s1" / "session-pack", pack)
    before = tree_hash(pack)
    with expdb.open(str(pack / "experiments.db"), create=False) as db:
        interrupted = db.runs().query("status == 'interrupted'")
    assert len(interrupted) == 1, "session 1 should have stopped inside its first trial"
    second = papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "session2.ipynb"), kernel_name="python3",
                                        parameters={**params, "TIME_BUDGET": "", "OUT": str(tmp_path / "s2"),
                                                    "CONTINUE_FROM": str(pack)},
                                        progress_bar=False, cwd=str(tmp_path))
    assert tree_hash(pack) == before
    assert images(second) >= 1 and "model: " in outputs(second)
    with expdb.open(str(tmp_path / "s2" / "experiments.db"), create=False) as db:
        runs = db.runs()
        continued = runs[runs["uid"] == interrupted["uid"].iloc[0]]      # the same run, merged in
        assert len(continued) == 1
        resumed = db.events(int(continued["id"].iloc[0]))
    assert sorted(runs["trial_number"]) == [0, 1, 2]                   # one row per trial, none repeated
    assert set(runs["status"]) <= {"completed", "pruned"}
    assert (resumed.query("kind == 'resume'")["step"] > 0).any()        # the trial went on from its checkpoint


@pytest.mark.slow
def test_the_interrupt_button_ends_the_run_as_ctrl_c_does_and_the_next_cell_works(tmp_path, data_cache):
    """A real kernel: the training cell is interrupted once a checkpoint exists (whenever that is)."""
    import time

    from jupyter_client.manager import start_new_kernel

    import expdb

    out = tmp_path / "work"
    overrides = {"subset": 0.02, "max_steps": 100000, "epochs": 1000, "save_every": 2, "eval_every": 50,
                 "block_size": 32, "n_layer": 1, "n_embd": 32, "cache_dir": str(data_cache), "progress": False}
    kernel, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        client.execute("import studies.notebook as nb\n"
                       f"settings = nb.Settings.from_cell(MODE='quick', TASK='run', TRIALS=1, TIME_BUDGET='', "
                       f"DATA='offline', OUT={str(out)!r}, OVERRIDES={overrides!r})")
        assert client.get_shell_msg(timeout=120)["content"]["status"] == "ok"
        client.execute("status = nb.train(settings, watch_every=0)")
        checkpoints = out / "runs" / "run" / "checkpoints"
        deadline = time.monotonic() + 600          # a bound on a hang, not on how fast training is
        while not any(checkpoints.glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(checkpoints.glob("step-*")), "no checkpoint was written"
        kernel.interrupt_kernel()                  # the notebook's interrupt button
        reply = client.get_shell_msg(timeout=300)
        assert reply["content"]["status"] == "ok"  # the cell ends cleanly, not with a traceback
        msg_id = client.execute("print('next cell', status, len(nb.results(settings)))")
        texts = []
        while True:
            msg = client.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                texts.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert "next cell 130 1" in "".join(texts)
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
    with expdb.open(str(out / "experiments.db"), create=False) as db:
        (run,) = db.runs().itertuples()
        assert run.status == "interrupted" and "signal" in (run.status_reason or "")
        assert (db.events(run.id)["kind"] == "signal").any()
