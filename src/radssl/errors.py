"""Error types that name the file, the field and the fix.

Every user-facing failure raises one of these *before* compute is spent, so a bad input never
surfaces as a stack trace deep inside a training step.
"""

from __future__ import annotations


class RadsslError(Exception):
    """Base class of every error radssl raises on purpose."""


class ConfigError(RadsslError):
    """A configuration file or command-line override is invalid."""


class DataError(RadsslError):
    """Input data are missing, corrupt or inconsistent.

    The message always starts with the offending file (or dataset name) and the field, then the fix.
    """

    def __init__(self, source: str, problem: str, fix: str | None = None) -> None:
        self.source = source
        self.problem = problem
        self.fix = fix
        message = f"{source}: {problem}"
        if fix:
            message += f" — {fix}"
        super().__init__(message)


class CheckpointError(RadsslError):
    """A checkpoint is missing, unreadable or does not match the run that asks for it."""
