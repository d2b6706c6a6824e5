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


class StopTraining(Exception):
    """Raised by a recorder (for example a study's pruner) to end a run early.

    Not a TrainerError: it is a request, not a fault. ``status`` is what the run row
    becomes (``pruned``, ``interrupted``), ``reason`` why.
    """

    def __init__(self, status: str, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")
