"""Install smallgpt-lab on Kaggle or Colab without fetching what they already ship.

The notebook's first cell runs this file (from the Kaggle dataset or from the clone it is opened
in) before the project is importable, so it imports nothing from the project and only the
standard library (plus ``packaging``, which pip itself carries). Where it looks, in order:

1. a Kaggle dataset under the input root (``/kaggle/input``, or ``$SMALLGPT_INPUT_ROOT``), at
   ``INPUT/*/`` or one level deeper: a ``smallgpt_lab-*.whl`` (the folder
   ``python -m studies.kaggle_dataset OUT_DIR`` makes), else a copy of the repository;
2. the repository this notebook is opened from (a folder with a ``pyproject.toml`` named
   smallgpt-lab, from the working directory upwards).

The project goes in with ``--no-deps``; then only its requirements that are not installed (or too
old) are installed: from the dataset's wheels with ``--no-index`` (Kaggle with Internet off), from
the package index for a repository (a clone, or a dataset made of one: that needs the Internet).
torch is never installed here: the preinstalled CUDA build stays.
Input folders are never written: a source folder is copied to a temporary folder and built there.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROJECT = "smallgpt-lab"
WHEELS = "smallgpt_lab-*.whl"
INPUT_ROOT = "/kaggle/input"                    # where Kaggle mounts the datasets of a notebook
INPUT_ROOT_ENV = "SMALLGPT_INPUT_ROOT"          # tests point it at a temporary folder
DATASET_COMMAND = "python -m studies.kaggle_dataset OUT_DIR"
KEEP = ("torch",)   # preinstalled with CUDA; a pip install would fetch a multi-GB build
NOT_FOUND = (f"{PROJECT} not found: attach the {PROJECT} Kaggle dataset (made with `{DATASET_COMMAND}`) "
             "or open this notebook from a clone")
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".cache", "runs",
                                     "experiments.db*", ".venv", "wheels-*")


class InstallError(Exception):
    """Nothing to install from, or pip failed; shown as its one line in a notebook."""

    def _render_traceback_(self) -> list[str]:     # IPython: the message, not a traceback
        return [f"InstallError: {self}"]


@dataclass(frozen=True)
class Source:
    """Where the project comes from: ``path`` is a wheel or a source folder; ``find_links`` the
    folder of wheels for the missing requirements (installed with --no-index), None: the index."""
    kind: str
    path: Path
    find_links: Path | None


def is_project(folder: Path) -> bool:
    """A folder holding this project's pyproject.toml."""
    try:
        text = (folder / "pyproject.toml").read_text()
    except OSError:
        return False
    return any(line.replace(" ", "") in ('name="smallgpt-lab"', "name='smallgpt-lab'")
               for line in text.splitlines())


def newest_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob(WHEELS), key=lambda p: [(0, int(x), "") if x.isdigit() else (1, 0, x)
                                                       for x in p.name.split("-")[1].split(".")])
    return wheels[-1] if wheels else None


def find_source(input_root: Path | str = INPUT_ROOT, cwd: Path | str | None = None) -> Source | None:
    """The first place the project can be installed from, or None (see the module docstring)."""
    root = Path(input_root)
    folders = sorted(p for p in root.glob("*/") if p.is_dir()) if root.is_dir() else []
    folders += sorted(p for f in folders for p in f.glob("*/") if p.is_dir())   # one level deeper
    for folder in folders:
        wheel = newest_wheel(folder)
        if wheel is not None:
            return Source("Kaggle dataset (wheel)", wheel, folder)
    for folder in folders:
        if is_project(folder):
            return Source("Kaggle dataset (repository)", folder, None)
    here = Path(cwd or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if is_project(folder):
            return Source("repository", folder, None)
    return None


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:                            # pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def missing(requires: list[str], version_of=importlib.metadata.version) -> tuple[list[str], list[str]]:
    """(requirements to install, kept ones that do not satisfy) among ``requires`` (Requires-Dist
    lines): those of no extra, whose marker holds, and not installed at a satisfying version."""
    Requirement = _requirement_class()
    to_install, kept = [], []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and req.specifier.contains(have, prereleases=True):
            continue
        if req.name.lower() in KEEP:
            kept.append(f"{req.name} {have or '(none)'}, though the project asks for {req.specifier}")
        else:
            to_install.append(str(req))
    return to_install, kept


def pip(args: list[str], log=print) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    log("$ pip install " + " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"pip install {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def index_args(source: Source) -> list[str]:
    return ["--no-index", "--find-links", str(source.find_links)] if source.find_links else []


def install_project(source: Source, log=print) -> None:
    """The project alone, with --no-deps; a source folder is built from a temporary copy."""
    if source.path.is_file():
        pip(["--no-deps", *index_args(source), str(source.path)], log)
        return
    with tempfile.TemporaryDirectory(prefix="smallgpt-lab-src-") as tmp:
        copy = Path(tmp) / "smallgpt-lab"
        shutil.copytree(source.path, copy, ignore=COPY_IGNORE)
        offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        pip(["--no-deps", *offline, *index_args(source), str(copy)], log)


def installed_requires() -> list[str]:
    importlib.invalidate_caches()
    return importlib.metadata.distribution(PROJECT).requires or []


def install(source: Source, log=print) -> list[str]:
    """Install the project from ``source`` and the requirements it lacks; returns those installed."""
    log(f"installing {PROJECT} from the {source.kind}: {source.path}")
    install_project(source, log)
    to_install, kept = missing(installed_requires())
    for note in kept:
        log(f"kept the preinstalled {note}")
    if to_install:
        try:
            pip([*index_args(source), *to_install], log)
        except InstallError as e:
            if source.find_links:
                raise
            raise InstallError(f"{e}\nthese come from the package index: turn the Internet on, or attach the "
                               f"{PROJECT} Kaggle dataset (made with `{DATASET_COMMAND}`)") from None
    importlib.invalidate_caches()
    log(f"{PROJECT} installed" + (f" with {', '.join(to_install)}" if to_install else ", every requirement was here"))
    return to_install


def main(input_root: str | None = None, cwd: str | None = None, log=print) -> Source:
    source = find_source(input_root or os.environ.get(INPUT_ROOT_ENV, INPUT_ROOT), cwd)
    if source is None:
        raise InstallError(NOT_FOUND)
    install(source, log)
    return source


if __name__ == "__main__":
    main()
