"""Benchmarks side by side with the peers: ``python -m bench`` (see bench/__main__.py).

Each part module (throughput, metric_logging, checkpoints, study, dashboard, gpu) has a
``run(repeats, smoke, ...)`` that returns a plain dict for the results JSON; ``report``
turns that JSON into docs/benchmarks.md.
"""
