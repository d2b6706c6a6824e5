"""Bad input on the command line: one clear line per problem, exit 2, nothing written."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# flags, and what the one error line must say: the flag, the value, and the fix.
BAD = [
    (["--preset", "huge"], ["--preset 'huge'", "choose one of quick, kaggle-t4"]),
    (["--lr", "-0.001"], ["--lr -0.001", "positive learning rate"]),
    (["--data-files", "missing.txt"], ["--data-files", "missing.txt"]),
    (["--n-embd", "100", "--n-head", "3"], ["--n-embd 100 is not divisible by --n-head 3"]),
    (["--epochs", "two"], ["--epochs", "two"]),
    (["--config", "nope.yaml"], ["--config 'nope.yaml'", "no such file"]),
]


@pytest.mark.parametrize("module", ["trainer", "studies.search"])
@pytest.mark.parametrize("flags,expected", BAD, ids=[b[0][0] for b in BAD])
def test_bad_flags_fail_clearly_and_write_nothing(module, flags, expected, tmp_path):
    if module == "studies.search" and flags[0] not in ("--preset", "--config"):
        flags = ["--config", _write_config(tmp_path, flags)]
    result = run([module, *flags], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert all(text in error_lines[0] for text in expected), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(p for p in os.listdir(tmp_path) if p.endswith(".yaml"))


def test_bad_fault_injection_setting_fails_clearly_and_writes_nothing(tmp_path, data_cache):
    env = {**os.environ, "PYTHONPATH": ROOT, "TRAINER_INJECT_OOM": "3;7"}
    result = subprocess.run([sys.executable, "-m", "trainer", "--preset", "quick", "--subset", "0.01",
                             "--cache-dir", str(data_cache)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "TRAINER_INJECT_OOM='3;7': expected optimizer step numbers like 3,7" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


def _write_config(tmp_path, flags):
    """The study takes hyperparameters from --config: turn `--flag value` into a YAML file."""
    if flags[0] == "--epochs":
        text = "epochs: two\n"
    else:
        pairs = zip(flags[::2], flags[1::2])
        text = "".join(f"{k[2:].replace('-', '_')}: {v}\n" for k, v in pairs)
    (tmp_path / "bad.yaml").write_text(text)
    return "bad.yaml"


def test_search_help_answers_without_importing_torch(tmp_path):
    """--help and flag errors must not pay torch's import time (seconds on a cold disk)."""
    result = run(["studies.search", "--help"], cwd=tmp_path)
    assert result.returncode == 0 and "--trials" in result.stdout
    probe = "import sys; import studies.search as s; s.build_parser(); print(sorted(m for m in ('torch', 'optuna', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
