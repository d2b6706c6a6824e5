"""The dashboards package's exceptions."""
from __future__ import annotations


class DashboardError(Exception):
    """Base class of every error dashboards raises on purpose."""


class UsageError(DashboardError):
    """A command-line value cannot be used; the message names the flag, the value and the fix."""


class ReportError(DashboardError):
    """A study report cannot be made (unknown study, not an Optuna storage)."""
