"""User-facing errors.

Anything a user can cause (bad config, missing file, unknown name) raises :class:`RepbendError` with a
one-line message that says what is wrong and how to fix it. The CLI prints it without a traceback and
exits with status 2. Programming errors stay ordinary exceptions and keep their traceback.
"""
from __future__ import annotations


class RepbendError(Exception):
    """An error caused by the user's input; its message is one line with the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(RepbendError):
    """A configuration value is invalid (the message names the field)."""


class DivergenceError(RepbendError):
    """Training produced NaN/inf or exploding representations and was stopped."""

    exit_code = 3
