"""Early stopping: when a run's validation loss has stopped improving. A pure function of
the evaluation history, so the rule is tested on lists of numbers, without a model.

The rule (Keras's ``EarlyStopping``, on the validation loss): an evaluation *improves* when
its loss is below the reference by at least ``min_delta``; the reference is the loss of the
last evaluation that improved (the first evaluation sets it). After ``patience``
evaluations in a row that do not improve, the run stops. Several small gains that add up
to ``min_delta`` count as one improvement, once they do.

The best step reported (and exported as final_model/) is the lowest validation loss of all
evaluations, which is also the checkpoint rotation never deletes; it differs from the
reference only by gains smaller than ``min_delta``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence


class EarlyStop(NamedTuple):
    """The decision to stop at ``step``: ``best_step`` had the lowest validation loss."""

    step: int
    best_step: int
    best_val_loss: float
    evals_without_improvement: int

    @property
    def reason(self) -> str:
        return f"early stop at step {self.step} (best at step {self.best_step})"


def decide(history: Sequence[tuple[int, float]], patience: int, min_delta: float) -> EarlyStop | None:
    """Stop now (an EarlyStop) or go on (None), given every (step, val_loss) so far, oldest first.

    ``patience`` 0 never stops. A non-finite loss never improves.
    """
    if patience <= 0 or not history:
        return None
    reference, since = math.inf, 0
    for _, loss in history:
        if math.isfinite(loss) and loss < reference - min_delta:
            reference, since = loss, 0
        else:
            since += 1
    if since < patience:
        return None
    best_step, best_loss = best_of(history)
    return EarlyStop(history[-1][0], best_step, best_loss, since)


def best_of(history: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """The (step, val_loss) with the lowest finite loss (the earliest on ties); (-1, inf) if none."""
    finite = [(loss, step) for step, loss in history if math.isfinite(loss)]
    if not finite:
        return -1, math.inf
    loss, step = min(finite)
    return step, loss
