"""Quantities derived from the recorded metrics, defined once for every package.

A leaf module (it imports nothing from this project): the trainer, studies and dashboards
all compute perplexity here, so a number means the same on the progress bar, in the
database and on a dashboard.
"""
from __future__ import annotations

import math

# exp() of a loss above this overflows a float64; such a perplexity is infinite.
MAX_FINITE_LOG = math.log(1.7976931348623157e308)


def perplexity(loss: float | None) -> float:
    """exp(loss) in nats; inf where it overflows or the loss is not finite, NaN for NaN/None."""
    if loss is None or math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < MAX_FINITE_LOG else math.inf
