"""The benchmark command keeps working: results JSON and markdown with the expected parts and rows.

Nothing here times anything: the smoke sizes make every figure meaningless on purpose.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)    # bench/ is a directory of the checkout, not part of the installed package

from bench.__main__ import DEFAULT_PARTS, main, parse_args  # noqa: E402
from bench.common import ratio, row, summary, target  # noqa: E402
from bench.curves import BudgetReached, Point, Run, Watch  # noqa: E402
from bench.interleave import run_interleaved  # noqa: E402
from bench.report import markdown  # noqa: E402


def smoke(tmp_path, *parts):
    out, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    assert main(["--smoke", "--repeats", "1", "--out", str(out), "--docs", str(docs),
                 "--cache-dir", str(tmp_path / "cache"), *parts]) == 0
    return json.loads(out.read_text()), docs.read_text()


def check_part(part):
    assert part["smoke"] is True and part["rows"], part["title"]
    for r in part["rows"] + part["ratios"]:
        assert {"name", "median", "min", "max", "values"} <= set(r)
        assert r["min"] <= r["median"] <= r["max"]


def test_one_part_runs_alone_and_merges_into_earlier_results(tmp_path):
    results, md = smoke(tmp_path, "checkpoints")
    assert list(results["parts"]) == ["checkpoints"]
    check_part(results["parts"]["checkpoints"])
    names = [r["name"] for r in results["parts"]["checkpoints"]["rows"]]
    assert {"stall: trainer background save", "stall: torch.save", "write: lists-of-floats JSON, weights"} <= set(names)
    assert {"cpu", "cores", "ram_gb"} <= set(results["meta"]["machine"])
    assert {"python", "torch", "transformers", "optuna", "sqlalchemy", "mlflow"} <= set(results["meta"]["versions"])
    assert "## 1. Checkpoints and exports" in md and "| stall: torch.save |" in md

    results, md = smoke(tmp_path, "gpu")          # the second run keeps the first one's part
    assert list(results["parts"]) == ["checkpoints", "gpu"]
    assert "## 1. Checkpoints and exports" in md and "## 2. GPU throughput" in md
    if not results["parts"]["gpu"]["measured"]:
        assert "not measured: no CUDA GPU on this machine" in md


@pytest.mark.slow
def test_smoke_run_of_every_part(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    cmd = [sys.executable, "-m", "bench", "--smoke", "--repeats", "1", "--out", str(out), "--docs", str(docs),
           "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results, md = json.loads(out.read_text()), docs.read_text()
    assert list(results["parts"]) == list(DEFAULT_PARTS)      # quality runs only when named
    for name, part in results["parts"].items():
        if name != "gpu" or part["measured"]:
            check_part(part)
    tput = {r["name"] for r in results["parts"]["throughput"]["ratios"]}
    assert {"trainer fp32 / plain loop fp32", "HF Trainer fp32 / plain loop fp32",
            "trainer fp32 / HF Trainer fp32"} <= tput
    assert "## Targets" in md and "smoke run, not a measurement" in md
    for title in ("Training throughput", "Metric logging", "Checkpoints and exports", "Studies", "Dashboards"):
        assert title in md


def test_markdown_from_results():
    part = {"title": "Thing", "date": "d", "repeats": 2, "smoke": False, "settings": {"n": 1},
            "method": "how", "rows": [row("a", [1000.0, 2000.0], "tokens/s")],
            "ratios": [ratio("a / b", [1.0, 2.0], [2.0, 2.0])],
            "targets": [target("a / b", 0.75, 0.98)], "notes": ["a note"],
            "load_average": {"per_round": [[1.5, 1.0, 0.5], [0.25, 0.9, 0.5], [3.0, 2.0, 1.0]]}}
    results = {"meta": {"date": "d", "command": "python -m bench", "results": "r.json",
                        "machine": {"cpu": "CPU", "cores": 2, "load_average": [0.5, 0.25, 0.125]},
                        "versions": {"python": "3"}},
               "parts": {"throughput": part}}
    md = markdown(results)
    assert "| a | 1,500 | 1,000 – 2,000 | tokens/s |" in md
    assert "| a / b | 0.750 | 0.500 – 1.000 |" in md
    assert "| a / b | ≥ 0.980 | 0.750 | **missed** |" in md
    assert "- a note" in md
    # the load beside the figures: per round, and the machine's at the end of the run
    assert "- load average (1 min) after each round: 1.50, 0.25, 3.00 (median 1.50)" in md
    assert "- load average (1/5/15 min) at the end of the run: 0.50/0.25/0.12" in md


def test_summary_and_paired_ratio():
    assert summary([3.0, 1.0, 2.0])["median"] == 2.0
    r = ratio("x", [2.0, 4.0, 9.0], [1.0, 2.0, 3.0])       # paired by round: 2, 2, 3
    assert (r["median"], r["min"], r["max"]) == (2.0, 2.0, 3.0)


def test_interleaved_loops_take_turns_and_count_only_their_own_time():
    # The loops advance a clock of the test's own instead of sleeping: the bookkeeping is
    # checked exactly, whatever the machine's speed or load.
    order, now = [], [0.0]

    def loop(name, seconds):
        def run(clock):
            for step in range(1, 4):
                order.append(name)
                now[0] += seconds
                clock.stamp(step)
        return run

    clocks = run_interleaved({"fast": loop("fast", 1.0), "slow": loop("slow", 5.0)}, timer=lambda: now[0])
    assert order == ["fast", "slow"] * 3
    fast, slow = clocks["fast"].stamps, clocks["slow"].stamps
    assert fast == {1: 1.0, 2: 2.0, 3: 3.0}         # its own time only: the other's 5 s never counted
    assert slow == {1: 5.0, 2: 10.0, 3: 15.0}
    assert clocks["fast"].tokens_per_s(1, 3, tokens_per_step=100) == 100.0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        parse_args(["nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    for budgets in (["--budgets", "1,x"], ["--budgets", "0,2"], ["--budgets", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["quality", *budgets])
    args = parse_args(["--smoke"])
    assert args.parts == list(DEFAULT_PARTS) and "quality" not in args.parts and args.out.name == "smoke.json"
    args = parse_args(["quality", "--budgets", "2,5,10", "--corpus", "wikitext"])
    assert args.parts == ["quality"] and args.budgets == (2.0, 5.0, 10.0) and args.corpus == "wikitext"


def test_a_failing_loop_stops_the_others_at_their_next_step():
    steps = []

    def good(clock):
        for step in range(1, 100):
            steps.append(step)
            clock.stamp(step)

    def bad(clock):
        clock.stamp(1)
        raise ValueError("broken")

    with pytest.raises(RuntimeError, match="'bad' failed: ValueError: broken"):
        run_interleaved({"good": good, "bad": bad})
    assert steps == [1, 2]


def test_quality_smoke_has_every_contender_budget_and_the_headline(tmp_path):
    results, md = smoke(tmp_path, "quality")
    part = results["parts"]["quality"]
    check_part(part)
    grid = part["grid"]
    assert grid["budgets_min"] == [0.02, 0.04]
    contenders = ["(a) plain loop", "(b) HF Trainer, its defaults", "(c) trainer, today's defaults",
                  "(d) trainer, new recipe"]
    assert list(grid["contenders"]) == contenders and part["settings"]["new_recipe_arch"] == "llama"
    names = {r["name"] for r in part["rows"]}
    for name in contenders:
        assert {f"{name}: bpb at 0.02 min", f"{name}: bpb at 0.04 min", f"{name}: tokens/s", f"{name}: MFU",
                f"{name}: parameters"} <= names
        assert all(len(curve) >= 2 for curve in part["curves"][name])     # after the first step, and at the end
    # (a) always reaches its own final bpb; (d)'s ratio to it is a number, or "not reached"
    assert grid["contenders"]["(a) plain loop"]["reached"] == 1
    headline = part["headline"]
    assert (headline["ratio"] is None) == (headline["reached_in"] == 0)
    assert [t["name"] for t in part["targets"]] == [
        "time to (a)'s final bpb: (d) trainer, new recipe / (a) plain loop",
        "bpb at 0.04 min: (d) trainer, new recipe below (a) plain loop, 1 - ratio"]
    assert "## 1. Time to quality" in md and "| contender | parameters | bpb at 0.02 min | bpb at 0.04 min |" in md
    assert ("**not reached** in any seed" in md) == (headline["ratio"] is None)


def test_a_curve_is_read_at_budgets_and_at_a_bpb():
    run = Run([Point(0.0, 1, 5.0), Point(10.0, 50, 4.0), Point(20.0, 100, 3.0)], planned_steps=100,
              n_params=1, flops_per_token=6.0, tokens_per_step=10)
    assert run.bpb_at(0.0) == 5.0 and run.bpb_at(19.9) == 4.0 and run.bpb_at(20.0) == 3.0
    assert run.time_to(4.0) == 10.0
    assert run.time_to(3.5) == 15.0          # halfway between the evaluations at 10 s and 20 s
    assert run.time_to(5.5) == 0.0 and run.time_to(2.0) is None
    assert run.tokens_per_s == 99 * 10 / 20.0


def test_a_watch_stops_its_loop_before_the_largest_budget():
    # A clock of the test's own, advanced by the loop: the bookkeeping is checked exactly.
    now, steps = [0.0], []

    def loop(clock):
        watch = Watch(clock, None, [2.5, 4.5], every=100, last_step=1000)
        try:
            for step in range(1, 1000):
                now[0] += 1.0
                steps.append(step)
                watch.stamp(step)
        except BudgetReached:
            pass
        watches.append(watch)

    watches = []
    run_interleaved({"only": loop}, timer=lambda: now[0])
    # 1 s a step, counted from the end of step 1: step 5 ends at 4 s, and one more would pass 4.5 s
    assert steps == [1, 2, 3, 4, 5] and watches[0].seconds(5) == 4.0
