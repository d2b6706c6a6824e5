"""Command-line flags generated from TrainConfig, shared by ``python -m trainer`` and the studies.

Precedence: TrainConfig defaults < --preset < --config FILE < explicit flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from trainer.config import TrainConfig, flag, load_config_file
from trainer.errors import ConfigError, TrainerError
from trainer.presets import PRESETS, preset_values


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no page-long usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_or_auto(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sequences or 'auto', got {text!r}") from None


_TYPES = {"int": int, "float": float, "str": str, "bool": parse_bool, "str | None": str}


def add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"Starting point: {', '.join(PRESETS)} (default: quick without a GPU, kaggle-t4 with one).")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of settings; flags given here override it.")
    group = parser.add_argument_group("training settings (override the preset and --config)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        kwargs: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": argparse.SUPPRESS,
                                  "help": f.metadata["help"]}
        if f.type == "list[str]":
            kwargs.update(nargs="+", metavar="PATH")
        elif f.name == "micro_batch":
            kwargs.update(type=int_or_auto, metavar="N|auto")
        else:
            kwargs.update(type=_TYPES[f.type], metavar=f.name.upper())
        group.add_argument(flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Build and check the run's config from --preset, --config and the flags."""
    preset = preset_values(args.preset)
    values = dict(preset)
    if args.config:
        values.update(load_config_file(args.config))
    values.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")})
    values.update(overrides)
    if values.get("micro_batch") == "auto":  # keep the preset's micro_batch x grad_accum as the batch
        values["micro_batch"] = preset.get("micro_batch", TrainConfig.micro_batch)
        values["auto_micro_batch"] = True
    return TrainConfig.from_dict(values).check()


Check = tuple[str, Callable[[], object]]   # (what to put before its message, a function that raises)


def collect_problems(checks: Iterable[Check], errors: tuple[type[Exception], ...] = (TrainerError,)) -> list[str]:
    """Run every check; the problems of those that raise ``errors``, one line each.

    Every check runs, so one invocation lists every problem; none of them writes anything.
    """
    problems: list[str] = []
    for prefix, check in checks:
        try:
            check()
        except errors as exc:
            lines = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            problems += [prefix + " ".join(line.split()) for line in lines]
    return problems


def raise_problems(problems: list[str]) -> None:
    """A check's body for a function that returns its problems: raise them as one ConfigError."""
    if problems:
        raise ConfigError(problems)


def database_check(url: str, shared: bool = False) -> Check:
    """The check of ``--db url`` for a command that records a run (the database found through
    trainer.recorder.find_database). ``shared``: its --db-shared (another program's tables in the
    file are then no problem)."""
    from trainer.recorder import find_database

    return (f"--db {url!r}: ", lambda: raise_problems(find_database().problems(url, create=True, write=True,
                                                                               shared=shared)))


def environment_checks(cfg: TrainConfig) -> list[Check]:
    """What every run can check before its data is prepared, beyond its config: the
    TRAINER_INJECT_* and TRAINER_SIMULATED_STEP_S settings, the device and the precision, and
    a --deadline already past (the config alone accepts one: a study's trials meet such a deadline)."""
    from trainer.clock import SimulatedTime
    from trainer.device import place
    from trainer.memory import FaultInjector

    return [("", FaultInjector.from_env), ("", SimulatedTime.from_env), ("", lambda: place(cfg)),
            ("", lambda: _refuse_passed_deadline(cfg.deadline))]


def _refuse_passed_deadline(deadline: str) -> None:
    from trainer.clock import deadline_problem

    if isinstance(deadline, str) and (problem := deadline_problem(deadline)):
        raise ConfigError([problem])


def fail(prog: str, error: Exception, code: int = 2) -> NoReturn:
    """Print every problem of a user error on its own line and exit non-zero."""
    problems = error.problems if isinstance(error, ConfigError) else [str(error)]
    for problem in problems:
        print(f"{prog}: error: {problem}", file=sys.stderr)
    sys.exit(code)
