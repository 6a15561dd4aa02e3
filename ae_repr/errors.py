"""Error types the CLI maps to exit codes: UserError -> 2 (bad input/config), everything else -> 1."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration; the message is one line naming the bad input."""


class DataError(UserError):
    """A data set that is missing, unreadable or unusable."""


class ConfigError(UserError):
    """An invalid configuration or option value."""


class DataChanged(RuntimeError):
    """The data changed during a run (a run-time failure, exit code 1): its stages would see two versions."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss during training (a run-time failure, exit code 1)."""
