"""Make the folder of wheels a machine without the network lacks: the Kaggle dataset, or the GPU
check's carry. One home for "what the target already has" and "what we carry to it".

    python -m studies.kaggle_dataset OUT_DIR        # the Kaggle dataset (upload OUT_DIR, see README)
    python -m studies.kaggle_dataset --gpu-check    # .ci/wheels-py312/ for .ci/gpu-check

The Kaggle folder holds the project's wheel, the wheels of its requirements that Kaggle and Colab
do not ship (for Python 3.11 and 3.12), ``kaggle_install.py`` (what the notebook's first cell
runs) and Kaggle's ``dataset-metadata.json``. The GPU-check folder holds the wheels the check
machine lacks, for Python 3.12, and ``requirements.txt``: what ``.ci/gpu-check`` installs from it
with ``--no-index``. torch, triton and the CUDA libraries are never downloaded.

Dependencies are followed here, one ``pip download --no-deps`` round per level, so that nothing
the target has (torch above all) is fetched through another package's requirements.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from studies import kaggle_install

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# The torch and transformers stacks: every machine below has them (torch's and transformers'
# own requirements), and torch must never come through another package's requirement.
_TORCH_STACK = {"torch", "triton", "setuptools", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
                "filelock", "fsspec", "typing-extensions", "transformers", "huggingface-hub", "tokenizers",
                "safetensors", "numpy", "packaging", "pyyaml", "regex", "tqdm", "pip"}

# What Kaggle's GPU image ships for certain. Kaggle's image is Colab's base image plus
# Kaggle/docker-python's kaggle_requirements.txt (Dockerfile.tmpl: "uv pip install -r"), so a
# package is listed only where both ship it (Colab's base: torch, transformers, pandas, numpy,
# matplotlib, plotly, psutil, pyyaml, tqdm; kaggle_requirements.txt adds datasets, optuna,
# papermill). optuna (not on Colab), cmaes, sqlalchemy and alembic are carried: an extra wheel
# costs only space, since the installer installs only what is missing.
KAGGLE_HAS = _TORCH_STACK | {
    "datasets", "pyarrow", "pandas", "python-dateutil", "pytz", "tzdata", "six", "matplotlib", "pillow",
    "plotly", "psutil", "requests", "urllib3", "idna", "certifi", "charset-normalizer", "wheel",
    "ipykernel", "ipython"}

# The H100 check machine (Python 3.12, torch 2.11, transformers 5.17, no network) lacks sqlalchemy,
# alembic, optuna, datasets, plotly and perhaps more: everything beyond the two stacks is carried.
GPU_CHECK_HAS = _TORCH_STACK
GPU_CHECK_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0"}   # as the machine reports them


@dataclass(frozen=True)
class Target:
    """A machine to carry wheels to: its Pythons, what it has, and what it needs beyond the project's
    own requirements (named in pyproject's extras) or without some of them."""
    name: str
    pythons: tuple[str, ...]
    has: frozenset[str]
    extras: tuple[str, ...] = ()     # names from pyproject's optional dependencies
    skip: tuple[str, ...] = ()       # requirements the target runs without
    project_wheel: bool = True


KAGGLE = Target("kaggle", ("3.11", "3.12"), frozenset(KAGGLE_HAS))
# The check trains on the offline corpus: datasets (and pyarrow, 42 MB of a 64 MiB carry) stay home.
GPU_CHECK = Target("gpu-check", ("3.12",), frozenset(GPU_CHECK_HAS),
                   extras=("pytest", "pytest-timeout", "accelerate", "nvidia-ml-py"), skip=("datasets",),
                   project_wheel=False)
GPU_CHECK_DIR = ROOT / ".ci" / "wheels-py312"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_has(target: Target, name: str) -> bool:
    name = canonical(name)
    return name in target.has or (name.startswith("nvidia-") and name != "nvidia-ml-py")


def build_wheel(out: Path) -> Path:
    """The project's wheel, built from a temporary copy (the working tree is never written)."""
    with tempfile.TemporaryDirectory(prefix="smallgpt-lab-build-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT, copy, ignore=kaggle_install.COPY_IGNORE)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(out), str(copy)], check=True)
    return kaggle_install.newest_wheel(out)


def wheel_requires(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


def wanted(requires: list[str], target: Target, python: str, names: tuple[str, ...] = (),
           extras: tuple[str, ...] = ()) -> list[str]:
    """The requirements among ``requires`` the target lacks: those whose marker holds on the target's
    Linux x86-64 CPython with no extra or one of ``extras`` (the brackets a package was asked with),
    or whose name is in ``names`` (taken from pyproject's extras); not something it has or skips."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    out = []
    for line in requires:
        req = Requirement(line)
        named = canonical(req.name) in names
        if req.marker is not None and not named and \
                not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            continue
        if target_has(target, req.name) or canonical(req.name) in target.skip:
            continue
        req.marker = None
        out.append(str(req))
    return out


def tested(requirement: str) -> str:
    """``name==version`` of the version installed here (what CI tests) where it satisfies."""
    req = Requirement(requirement)
    try:
        here = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return requirement
    return f"{req.name}=={here}" if req.specifier.contains(here, prereleases=True) else requirement


def pip_target(python: str) -> list[str]:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms]


def download(requirements: list[str], out: Path, python: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    *pip_target(python), "--dest", str(out), *map(tested, requirements)], check=True)


def names_in(out: Path) -> dict[str, Path]:
    return {canonical(w.name.split("-")[0]): w for w in sorted(out.glob("*.whl"))}


def carry(top: list[str], target: Target, out: Path) -> None:
    """Download ``top`` and everything they need that the target lacks, for each of its Pythons."""
    for python in target.pythons:
        todo, asked = list(top), {}                      # asked: name -> the extras it was asked with
        while todo:
            download(todo, out, python)
            for req in map(Requirement, todo):
                asked.setdefault(canonical(req.name), set()).update(req.extras)
            found = names_in(out)
            deps = [r for name, extras in asked.items() if name in found
                    for r in wanted(wheel_requires(found[name]), target, python, extras=tuple(extras))]
            todo = sorted({r for r in deps if not_asked(Requirement(r), asked)})


def not_asked(req: Requirement, asked: dict[str, set[str]]) -> bool:
    name = canonical(req.name)
    return name not in asked or not req.extras <= asked[name]


def make(target: Target, out: Path) -> list[str]:
    """Fill ``out``; returns the top-level requirements carried (also written to requirements.txt)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smallgpt-lab-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        requires = wheel_requires(wheel)
        if target.project_wheel:
            shutil.copy2(wheel, out / wheel.name)
    top = list(dict.fromkeys(wanted(requires, target, target.pythons[-1], names=target.extras)))
    carry(top, target, out)
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in top))
    if target is KAGGLE:
        shutil.copy2(Path(kaggle_install.__file__), out / "kaggle_install.py")
        (out / "dataset-metadata.json").write_text(json.dumps(
            {"title": "smallgpt-lab", "id": "YOUR-KAGGLE-USERNAME/smallgpt-lab", "licenses": [{"name": "MIT"}]},
            indent=2) + "\n")
    return top


def stub_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel of metadata only, standing for a distribution the target has."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def dry_run(target: Target, folder: Path, versions: dict[str, str] | None = None) -> dict[str, tuple[str, bool]]:
    """What ``pip install --no-index --find-links folder -r folder/requirements.txt`` resolves to on the
    target: pip's --dry-run for its last Python, where what the target has is stood for by stub wheels
    (this machine's versions, or ``versions``). Returns {name: (version, from folder)}; raises
    CalledProcessError with pip's message when it does not resolve."""
    with tempfile.TemporaryDirectory(prefix="smallgpt-lab-dry-") as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        here = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
        for name in sorted(target.has):
            version = (versions or {}).get(name) or here.get(name)
            if version:
                stub_wheel(stubs, name, version)
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--dry-run",
                        "--ignore-installed", "--no-index", "--find-links", str(folder), "--find-links", str(stubs),
                        *pip_target(target.pythons[-1]), "--target", str(Path(tmp) / "target"),
                        "--report", str(report), "-r", str(folder / "requirements.txt")],
                       check=True, capture_output=True, text=True)
        chosen = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): (i["metadata"]["version"],
                                               stubs.as_posix() not in i["download_info"]["url"]) for i in chosen}


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.kaggle_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="The folder to fill (default with --gpu-check: "
                                                     f"{GPU_CHECK_DIR.relative_to(ROOT)}).")
    p.add_argument("--gpu-check", action="store_true", help="Wheels for .ci/gpu-check's machine (Python 3.12).")
    args = p.parse_args(argv)
    target = GPU_CHECK if args.gpu_check else KAGGLE
    out = args.out or (GPU_CHECK_DIR if args.gpu_check else None)
    if out is None:
        p.error("OUT_DIR is required: the folder to upload as the Kaggle dataset")
    top = make(target, out)
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {size_mb(out):.1f} MiB; carried: {', '.join(top)}")
    if target is KAGGLE:
        print(f"upload it as a Kaggle dataset: set the id in {out / 'dataset-metadata.json'}, then "
              f"`kaggle datasets create -p {out}` (or drag the folder into kaggle.com > Datasets > New dataset)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
