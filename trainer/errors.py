"""The trainer's exceptions. Each user-facing one carries a message that names the flag,
the value and the fix, so the command line can print it as is and exit non-zero."""
from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """One or more settings are invalid; ``problems`` lists each of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(TrainerError):
    """A data source is missing, empty or unreachable."""


class CheckpointError(TrainerError):
    """A checkpoint is missing, incomplete, corrupt or unsafe to load."""


class RankLost(RuntimeError):
    """A collective of a data-parallel run failed: another process of the run died or stopped
    answering. Not a TrainerError (nothing the user passed is wrong); the run ends failed."""


class StopTraining(Exception):
    """Raised by a recorder (for example a study's pruner) to end a run early.

    Not a TrainerError: it is a request, not a fault. ``status`` is what the run row
    becomes (``pruned``, ``interrupted``), ``reason`` why.
    """

    def __init__(self, status: str, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


# Exit codes of `python -m trainer` (documented in the README).
EXIT_FAILED = 1                # the run ended failed: diverged, out of memory at micro-batch 1, a rank lost
EXIT_USAGE = 2                 # bad flags, data or checkpoint: nothing was written
EXIT_TIME_BUDGET = 75          # EX_TEMPFAIL: stopped before --time-budget/--deadline; resume later
EXIT_SIGNALS = {"SIGINT": 130, "SIGTERM": 143, "KeyboardInterrupt": 130}   # 128 + signal number


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or Ctrl-C stopped the run at an optimizer-step boundary.

    Raised by ``train`` after the emergency checkpoint is complete and the recorder has
    finished the run as ``interrupted``. Deliberately not a TrainerError: callers that
    handle bad input must not swallow a request to stop. ``checkpoint_path`` is the
    checkpoint to resume from (None when no step had completed), ``exit_code`` what a
    command line should exit with.
    """

    def __init__(self, signal_name: str, checkpoint_path: str | None, exit_code: int):
        self.signal_name = signal_name
        self.checkpoint_path = checkpoint_path
        self.exit_code = exit_code
        where = f"resume from {checkpoint_path}" if checkpoint_path else "no step had completed"
        super().__init__(f"interrupted by {signal_name}; {where}")
