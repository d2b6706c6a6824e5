"""Installing on Kaggle with the Internet off: where the notebook's first cell finds the project
(studies/kaggle_install.py), what it installs, and, for real, the notebook executed from its first
cell in a fresh venv holding only Kaggle's preinstalled set, with the dataset made by
``python -m studies.kaggle_dataset`` under a read-only input folder and no package index reachable.

The venv is honest and fast: ``python -m venv --without-pip`` plus one .pth naming a folder of
symlinks to exactly the distributions of Kaggle's preinstalled set (``studies.kaggle_dataset.KAGGLE``)
and their requirements, as installed on this machine; the project and what Kaggle lacks are left out.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from studies import kaggle_dataset, kaggle_install
from studies.kaggle_install import NOT_FOUND, InstallError, Source, find_source, missing

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "train_small_gpt.ipynb"
PYPROJECT = '[project]\nname = "smallgpt-lab"\nversion = "0.1.0"\n'
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
            "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}


def project(folder: Path, text: str = PYPROJECT) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(text)
    return folder


def wheel(folder: Path, version: str = "0.1.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"smallgpt_lab-{version}-py3-none-any.whl"
    path.write_bytes(b"")
    return path


# --- where the project is found --------------------------------------------------------------

def test_a_dataset_wheel_comes_first_then_a_repository_dataset_then_the_clone(tmp_path):
    inputs, clone = tmp_path / "input", project(tmp_path / "clone")
    (clone / "notebooks").mkdir()
    repo = project(inputs / "a-repo")
    assert find_source(inputs, clone / "notebooks") == Source("Kaggle dataset (repository)", repo, None)
    wheel(inputs / "z-wheels", "0.1.0")
    newest = wheel(inputs / "z-wheels", "0.10.0")       # 0.10 is newer than 0.9, not older
    wheel(inputs / "z-wheels", "0.9.0")
    assert find_source(inputs, clone) == Source("Kaggle dataset (wheel)", newest, inputs / "z-wheels")
    shutil.rmtree(inputs)
    assert find_source(inputs, clone / "notebooks") == Source("repository", clone, None)


def test_a_dataset_one_level_deeper_is_found_and_deeper_is_not(tmp_path):
    inputs = tmp_path / "input"
    nested = wheel(inputs / "smallgpt-lab" / "wheels")
    assert find_source(inputs, tmp_path).path == nested
    shutil.rmtree(inputs)
    wheel(inputs / "a" / "b" / "c")
    assert find_source(inputs, tmp_path) is None


def test_another_project_is_not_taken_for_this_one(tmp_path):
    project(tmp_path / "input" / "other", '[project]\nname = "smallgpt-lab-fork"\n')
    project(tmp_path / "work", '[project]\nname = "not-this"\n')
    assert find_source(tmp_path / "input", tmp_path / "work") is None


def test_with_nothing_to_install_from_it_stops_with_one_line_naming_the_dataset_command(tmp_path):
    with pytest.raises(InstallError) as nothing:
        kaggle_install.main(input_root=str(tmp_path / "input"), cwd=str(tmp_path))
    (line,) = nothing.value._render_traceback_()
    assert "attach the smallgpt-lab Kaggle dataset" in line and kaggle_install.DATASET_COMMAND in line


def test_the_notebook_first_cell_stops_with_that_line_when_nothing_is_attached(tmp_path):
    """The cell as a fresh Python without site-packages runs it: the project is not importable."""
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    # Without PYTHONPATH too: a run of the suite that points it at the checkout would make the project importable.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           kaggle_install.INPUT_ROOT_ENV: str(tmp_path / "input")}
    done = subprocess.run([sys.executable, "-S", "-c", cell.source], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [NOT_FOUND]


# --- what is installed --------------------------------------------------------------------------

def versions(**have):
    def version_of(name):
        try:
            return have[name.replace("-", "_")]
        except KeyError:
            raise metadata.PackageNotFoundError(name) from None
    return version_of


def test_only_what_is_missing_or_too_old_is_installed_and_torch_never(tmp_path):
    requires = ["torch>=2.11", "transformers>=4.40", "optuna>=3.5", "sqlalchemy>=2.0", "pandas>=2.0",
                "pytest>=8; extra == \"test\"", "tomli; python_version < \"3.0\""]
    to_install, kept = missing(requires, versions(torch="2.6.0", transformers="4.57.1", sqlalchemy="1.4.54",
                                                  pandas="2.2.2"))
    assert to_install == ["optuna>=3.5", "sqlalchemy>=2.0"]
    assert kept == ["torch 2.6.0, though the project asks for >=2.11"]


def test_a_source_folder_is_built_from_a_copy_and_never_written(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kaggle_install, "pip", lambda args, log: calls.append(args))
    repo = project(tmp_path / "input" / "repo")
    (repo / "studies").mkdir()
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    kaggle_install.install_project(Source("Kaggle dataset (repository)", repo, None), log=print)
    (args,) = calls
    assert args[0] == "--no-deps" and Path(args[-1]).name == "smallgpt-lab" and repo not in Path(args[-1]).parents
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def test_a_repository_offline_with_requirements_missing_says_to_turn_the_internet_on(tmp_path, monkeypatch):
    def pip(args, log):
        if "--no-deps" not in args:
            raise InstallError("pip install optuna>=3.5 failed (1):\nNo matching distribution found for optuna")
    monkeypatch.setattr(kaggle_install, "pip", pip)
    monkeypatch.setattr(kaggle_install, "installed_requires", lambda: ["optuna>=3.5"])
    monkeypatch.setattr(kaggle_install, "missing", lambda requires: (requires, []))
    with pytest.raises(InstallError, match="turn the Internet on, or attach the smallgpt-lab Kaggle dataset"):
        kaggle_install.install(Source("repository", project(tmp_path / "clone"), None), log=print)


# --- for real: a Kaggle-like venv, the dataset read-only, no index ------------------------------

def closure(names: set[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions of ``names`` and everything they require (no extras)."""
    found, todo = {}, [kaggle_dataset.canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(kaggle_dataset.canonical(req.name))
    return found


def kaggle_like_venv(folder: Path, preinstalled: set[str]) -> Path:
    """A venv that sees ``preinstalled`` (and what they require, pip, setuptools) and nothing else."""
    dists = closure(preinstalled | {"pip", "setuptools", "wheel"})
    assert "smallgpt-lab" not in dists
    view = folder / "preinstalled"
    view.mkdir(parents=True)
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")
                and not f.parts[0].endswith(".pth")}
        for top in tops:
            if (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "kaggle_preinstalled.pth").write_text(f"{view}\n")
    return venv / "bin" / "python"


def tree_hash(top: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(top.rglob("*")):
        digest.update(str(path.relative_to(top)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_only(top: Path) -> None:
    for path in [top, *top.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def made_or_skipped(target, folder: Path, what: str) -> Path:
    """``kaggle_dataset.make(target, folder)``; skipped where PyPI does not answer, except on CI."""
    try:
        kaggle_dataset.make(target, folder)
    except subprocess.CalledProcessError as e:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            raise
        pytest.skip(f"making {what} needs PyPI, which did not answer: {e}")
    return folder


@pytest.fixture(scope="module")
def kaggle_dataset_dir(tmp_path_factory) -> Path:
    """The folder ``python -m studies.kaggle_dataset OUT_DIR`` makes (it downloads from PyPI)."""
    return made_or_skipped(kaggle_dataset.KAGGLE, tmp_path_factory.mktemp("dataset") / "smallgpt-lab",
                           "the Kaggle dataset")


@pytest.mark.slow
def test_the_notebook_installs_from_a_read_only_dataset_with_no_index_and_runs(tmp_path, kaggle_dataset_dir,
                                                                                data_cache, monkeypatch):
    import papermill

    inputs = tmp_path / "kaggle" / "input"
    dataset = inputs / "smallgpt-lab-dataset"
    shutil.copytree(kaggle_dataset_dir, dataset)
    read_only(inputs)
    before = tree_hash(inputs)
    python = kaggle_like_venv(tmp_path / "env", set(kaggle_dataset.KAGGLE.has) | {"ipykernel"})
    assert not {"optuna", "cmaes", "sqlalchemy", "alembic"} & set(closure(set(kaggle_dataset.KAGGLE.has)))
    spec = tmp_path / "jupyter" / "kernels" / "kaggle"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"],
                                                  "display_name": "Kaggle-like", "language": "python"}))
    for key, value in {**NO_INDEX, "JUPYTER_PATH": str(tmp_path / "jupyter"),
                       kaggle_install.INPUT_ROOT_ENV: str(inputs), "TRAINER_SIMULATED_STEP_S": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    overrides = {"subset": 0.02, "max_steps": 4, "eval_every": 2, "block_size": 32, "eval_batches": 1,
                 "n_layer": 1, "n_embd": 32, "cache_dir": str(data_cache), "progress": False}
    done = papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="kaggle",
                                      parameters=dict(MODE="quick", TASK="run", TRIALS=1, TIME_BUDGET="",
                                                      DATA="offline", OUT=str(work), OVERRIDES=overrides,
                                                      WATCH_EVERY=0),
                                      progress_bar=False, cwd=str(work))
    said = "\n".join(o.get("text", "") for c in done.cells for o in c.get("outputs", []))
    assert f"installing smallgpt-lab from the Kaggle dataset (wheel): {dataset}" in said
    assert "--no-index" in said and "optuna>=3.5" in said and "memory check:" in said and "session pack:" in said
    (site_packages,) = (tmp_path / "env" / "venv").glob("lib/python*/site-packages")
    installed = {p.name.split("-")[0].lower() for p in site_packages.glob("*.dist-info")}
    assert {"smallgpt_lab", "optuna", "cmaes", "sqlalchemy", "alembic"} <= installed
    assert not installed & {"torch", "transformers", "pandas", "numpy", "datasets"}   # the preinstalled stay
    assert tree_hash(inputs) == before                                                 # the input not written


@pytest.mark.slow
def test_a_repository_dataset_is_built_from_a_copy_offline_when_nothing_else_is_missing(tmp_path, monkeypatch):
    """The repository itself as the dataset (or a clone): the project is built without build isolation
    (nothing fetched) from a temporary copy; the read-only input is not written."""
    inputs = tmp_path / "input"
    shutil.copytree(ROOT, inputs / "smallgpt-lab", ignore=kaggle_install.COPY_IGNORE)
    read_only(inputs)
    before = tree_hash(inputs)
    requires = {Requirement(r).name for r in metadata.distribution("smallgpt-lab").requires
                if "extra ==" not in r}
    python = kaggle_like_venv(tmp_path / "env", requires)
    env = {**os.environ, **NO_INDEX, kaggle_install.INPUT_ROOT_ENV: str(inputs)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), str(inputs / "smallgpt-lab" / "studies" / "kaggle_install.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "from the Kaggle dataset (repository)" in done.stdout and "every requirement was here" in done.stdout
    check = subprocess.run([str(python), "-c", "import studies.notebook, trainer.run; print(trainer.run.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and str(tmp_path / "env" / "venv") in check.stdout, check.stderr
    assert tree_hash(inputs) == before


# --- the wheels resolve for Python 3.12 (Colab; the GPU check's machine) --------------------------

@pytest.mark.slow
def test_the_kaggle_dataset_resolves_for_python_312_as_well(kaggle_dataset_dir):
    chosen = kaggle_dataset.dry_run(kaggle_dataset.KAGGLE, kaggle_dataset_dir)
    carried = {name for name, (_, from_folder) in chosen.items() if from_folder}
    assert {"optuna", "cmaes", "sqlalchemy", "alembic"} <= carried
    assert not carried & kaggle_dataset.KAGGLE.has


@pytest.mark.slow
def test_the_gpu_check_wheels_resolve_on_its_machine_without_torch_in_the_folder(tmp_path):
    """``python -m studies.kaggle_dataset --gpu-check`` into a temporary folder, then pip's --dry-run
    for Python 3.12 with --no-index: torch 2.11 and transformers 5.17 stand for the machine's own."""
    folder = made_or_skipped(kaggle_dataset.GPU_CHECK, tmp_path / "wheels-py312", "the GPU check's wheels")
    wheels = {kaggle_dataset.canonical(w.name.split("-")[0]) for w in folder.glob("*.whl")}
    assert not {w for w in wheels if w in ("torch", "triton", "transformers") or
                (w.startswith("nvidia-") and w != "nvidia-ml-py")}
    assert kaggle_dataset.size_mb(folder) < 64                      # what the device tool carries
    chosen = kaggle_dataset.dry_run(kaggle_dataset.GPU_CHECK, folder, kaggle_dataset.GPU_CHECK_VERSIONS)
    needed = {"sqlalchemy", "alembic", "optuna", "plotly", "pandas", "matplotlib", "pytest", "pytest-timeout",
              "accelerate", "nvidia-ml-py", "psutil", "cmaes"}
    assert {name for name, (_, from_folder) in chosen.items() if from_folder} >= needed
    assert chosen.get("torch", ("2.11.0", False)) == ("2.11.0", False)   # the machine's torch, kept
