"""Draw a learning-rate range test (trainer.lr_find's Curve and Suggestion) as a PNG:
loss against lr on a log axis, the raw losses faint, the smoothed curve over them, the
suggestion and the config's own lr as vertical lines."""
from __future__ import annotations

import io
import math
from pathlib import Path

from trainer.files import atomic_write_bytes


def render(curve, suggestion, config_lr: float, out: Path | None = None) -> bytes:
    """The PNG's bytes; also written (atomically) to ``out`` when given."""
    import matplotlib
    matplotlib.use("Agg")      # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(curve.lrs, curve.losses, color="#1f77b4", alpha=0.3, lw=1, label="loss per step")
    finite = [(lr, y) for lr, y in zip(curve.lrs, curve.smoothed) if math.isfinite(y)]
    ax.plot(*zip(*finite), color="#1f77b4", lw=2, label="smoothed loss")
    ax.axvline(suggestion.lr, color="#d62728", ls="--", lw=1.5,
               label=f"suggested lr {suggestion.lr:.2g} ({suggestion.rule})")
    ax.axvline(config_lr, color="#7f7f7f", ls=":", lw=1.5, label=f"config lr {config_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    low = min(y for _, y in finite)
    ax.set_ylim(low - 0.1 * abs(low), min(max(y for _, y in finite), 2 * curve.smoothed[0]) * 1.05)
    ax.set_title(f"Learning-rate range test: {len(curve.lrs)} steps; {curve.stopped}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    payload = buffer.getvalue()
    if out is not None:
        atomic_write_bytes(out, payload)
    return payload
