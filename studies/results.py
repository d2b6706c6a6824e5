"""A study's trials as one table: state, run, validation loss and perplexity, time, parameters."""
from __future__ import annotations

import math

import optuna
import pandas as pd

from studies.trial import FAIL_REASON_ATTR, RUN_ID_ATTR
from trainer.metrics import perplexity


def results_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        loss = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                    if t.intermediate_values else math.nan)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "run_id": t.user_attrs.get(RUN_ID_ATTR),
                     "val_loss": loss, "val_ppl": perplexity(loss),
                     "seconds": t.duration.total_seconds() if t.duration else math.nan, **t.params,
                     "note": t.user_attrs.get(FAIL_REASON_ATTR, "")[:60]})
    return pd.DataFrame(rows)
