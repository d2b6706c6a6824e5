"""python -m bench: measure this project side by side with its peers.

    python -m bench                       # every part (about ten minutes on 2 CPU cores)
    python -m bench throughput ddp        # some parts; the others keep their last results
    python -m bench --smoke               # tiny sizes in seconds: checks the benchmarks still run
    python -m bench quality               # time to quality (~50 minutes): only when named
    python -m bench quality --device cuda --budgets 0.1,0.2 --repeats 1   # on a GPU, kaggle-t4 size, fp16

The quality part trains four recipes for minutes each, so a run of every part leaves it out;
name it to run it (``--budgets``, ``--corpus``, ``--recipe-arch`` and ``--device`` are its options).

Results go to a JSON file (default bench/results/latest.json) and docs/benchmarks.md is
regenerated from it. A smoke run writes bench/results/smoke.json and smoke.md instead, so
it never overwrites real figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

PARTS = ("throughput", "logging", "checkpoints", "studies", "dashboards", "gpu", "mirrors", "exports", "ddp",
         "quality")
DEFAULT_PARTS = tuple(x for x in PARTS if x != "quality")    # what runs when no part is named
RESULTS = Path("bench/results/latest.json")
DOCS = Path("docs/benchmarks.md")
SMOKE_RESULTS = Path("bench/results/smoke.json")
SMOKE_DOCS = Path("bench/results/smoke.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"Parts to run: {', '.join(PARTS)} (default: all but quality).")
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: seconds, not figures.")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="Rounds of every comparison (default: 3).")
    p.add_argument("--out", type=Path, default=None, metavar="JSON",
                   help=f"Results file, merged by part (default: {RESULTS}, or {SMOKE_RESULTS} with --smoke).")
    p.add_argument("--docs", type=Path, default=None, metavar="MD",
                   help=f"Markdown written from the results (default: {DOCS}, or {SMOKE_DOCS} with --smoke).")
    p.add_argument("--cache-dir", default=".cache/bench", metavar="DIR",
                   help="Tokenizer and token caches of the benchmark corpora (default: .cache/bench).")
    p.add_argument("--budgets", type=budget_list, default=None, metavar="MIN,MIN,...",
                   help="quality: training budgets in minutes (default: 1,2,3; with --smoke, seconds' worth).")
    p.add_argument("--corpus", choices=("offline", "wikitext"), default="offline",
                   help="quality: the trainer's offline corpus, or WikiText-2 from ../shared/data (default: offline).")
    p.add_argument("--recipe-arch", choices=("llama", "gpt2"), default="llama",
                   help="quality: the blocks of the new recipe (muon + llama); gpt2 measures Muon alone.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="quality: cpu (fp32), or cuda:0 at kaggle-t4 size in fp16 with a gradient scaler, "
                        "as on a T4 (default: cpu).")
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: use at least 1")
    if args.device == "cuda":
        device_problem = cuda_refusal(args.parts)
        if device_problem:
            p.error(device_problem)
    args.parts = [x for x in PARTS if x in args.parts] or list(DEFAULT_PARTS)
    args.out = args.out or (SMOKE_RESULTS if args.smoke else RESULTS)
    args.docs = args.docs or (SMOKE_DOCS if args.smoke else DOCS)
    return args


def cuda_refusal(parts: list[str]) -> str | None:
    """Why ``--device cuda`` cannot run, or None: checked before any part starts, so a machine
    without a GPU fails at once rather than after the parts before quality."""
    if "quality" not in parts:
        return "--device cuda: only the quality part takes it; name it (python -m bench quality --device cuda)"
    import torch  # here, not at the top: --help must not wait for torch

    if not torch.cuda.is_available():
        return "--device cuda: no CUDA GPU visible to torch on this machine; leave --device out to run on the CPU"
    return None


def budget_list(text: str) -> tuple[float, ...]:
    """--budgets 1,2,3: positive minutes."""
    try:
        budgets = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give minutes separated by commas, e.g. 1,2,3") from None
    if not all(0 < b < float("inf") for b in budgets):
        raise argparse.ArgumentTypeError(f"{text!r}: every budget must be a positive number of minutes")
    return budgets


def runners(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    from bench import checkpoints, dashboard, ddp, exports, gpu, metric_logging, mirrors, quality, study, throughput
    r, s, c = args.repeats, args.smoke, args.cache_dir
    return {"throughput": lambda: throughput.run(r, s, c), "logging": lambda: metric_logging.run(r, s),
            "checkpoints": lambda: checkpoints.run(r, s), "studies": lambda: study.run(r, s, c),
            "dashboards": lambda: dashboard.run(r, s), "gpu": lambda: gpu.run(r, s, c),
            "mirrors": lambda: mirrors.run(r, s), "exports": lambda: exports.run(r, s, c),
            "ddp": lambda: ddp.run(r, s, c),
            "quality": lambda: quality.run(r, s, c, args.budgets, args.corpus, args.recipe_arch, device=args.device)}


def quiet() -> None:
    """Progress bars and per-step prints of the contenders would bury the benchmark's own lines."""
    import logging
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("expdb").setLevel(logging.ERROR)


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"parts": {}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    from bench.common import machine, now, versions
    from bench.report import markdown

    results = load(args.out)
    todo = runners(args)
    for name in args.parts:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        results["parts"][name] = todo[name]()
        results["parts"][name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {results['parts'][name]['seconds']:.0f} s", flush=True)
    command = "python -m bench" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    results["meta"] = {"date": now(), "command": command, "results": str(args.out),
                       "machine": machine(), "versions": versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(markdown(results))
    print(f"wrote {args.out} and {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
