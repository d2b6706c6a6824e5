"""What every benchmark part shares: alternation, summaries, ratios, the machine and versions.

A part returns a plain dict (see ``part``) that goes into the results JSON as is; the
markdown in docs/benchmarks.md is generated from that JSON alone (``bench.report``).
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

VERSIONED = ("torch", "transformers", "accelerate", "optuna", "sqlalchemy", "mlflow", "pandas",
             "numpy", "matplotlib", "plotly", "safetensors")


# -- summaries -------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, Any]:
    """Median, minimum and maximum of repeated measurements, with the raw values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": list(values)}


def row(name: str, values: list[float], unit: str, *, higher_is_better: bool = True,
        note: str = "") -> dict[str, Any]:
    """One measured quantity: a line of a part's table."""
    return {"name": name, "unit": unit, "higher_is_better": higher_is_better, "note": note,
            **summary(values)}


def ratio(name: str, top: list[float], bottom: list[float], note: str = "") -> dict[str, Any]:
    """top / bottom. Paired by round when both have one value per round (adjacent in time, so
    the machine's load drifts out); the median of the pairs is the figure reported."""
    if len(top) == len(bottom):
        pairs = [a / b for a, b in zip(top, bottom)]
    else:
        pairs = [statistics.median(top) / statistics.median(bottom)]
    return {"name": name, "note": note, **summary(pairs)}


def target(name: str, got: float, want: float, *, at_least: bool = True, unit: str = "") -> dict[str, Any]:
    met = got >= want if at_least else got <= want
    return {"name": name, "got": got, "want": want, "at_least": at_least, "unit": unit, "met": met}


def part(title: str, *, settings: dict[str, Any], method: str, rows: list[dict], ratios: list[dict] = (),
         targets: list[dict] = (), notes: list[str] = (), repeats: int, smoke: bool,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"title": title, "date": now(), "repeats": repeats, "smoke": smoke, "settings": settings,
            "method": method, "rows": list(rows), "ratios": list(ratios), "targets": list(targets),
            "notes": list(notes), **(extra or {})}


# -- alternation -----------------------------------------------------------------------
def alternate(contenders: dict[str, Callable[[], float]], repeats: int,
              log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Run every contender once per round, ``repeats`` rounds; the order rotates each round
    (a b c, b c a, c a b) so no contender always follows the same one."""
    names = list(contenders)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            value = contenders[name]()
            results[name].append(value)
            log(f"  round {r + 1}/{repeats} {name}: {value:,.4g}")
    return results


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class StepClock:
    """Timestamps at the end of optimizer steps, taken at the same point in every loop."""

    stamps: dict[int, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)   # seconds of side work, by kind (bench.throughput)

    def stamp(self, step: int) -> None:
        self.stamps[step] = time.perf_counter()

    def tokens_per_s(self, first: int, last: int, tokens_per_step: int) -> float:
        """Throughput over steps first+1 .. last, everything the loop did in between included."""
        missing = [s for s in (first, last) if s not in self.stamps]
        if missing:
            raise RuntimeError(f"no timestamp at step(s) {missing}: the loop stopped early")
        return (last - first) * tokens_per_step / (self.stamps[last] - self.stamps[first])


# -- the machine -----------------------------------------------------------------------
def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages: printed and stored beside the figures,
    so that a run on a loaded machine can be told apart from a regression."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:      # not available on this platform
        return []


def load_text() -> str:
    return "load " + "/".join(f"{x:.2f}" for x in load_average())


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        cpuinfo = open("/proc/cpuinfo", encoding="utf-8").read()
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                      if ln.startswith("model name")), None)
        info["cpu"] = model or info["cpu"]
        flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
        info["cpu_bf16"] = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        pass
    try:
        import psutil
        info["ram_gb"] = round(psutil.virtual_memory().total / 1024 ** 3, 1)
    except ImportError:
        pass
    import torch
    info["torch_threads"] = torch.get_num_threads()
    info["load_average"] = load_average()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
