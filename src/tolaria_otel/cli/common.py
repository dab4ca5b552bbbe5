"""What every command shares: its name in messages, the error for bad input, and reading the environment.

A command raises :class:`CommandError` for bad input; ``main`` (``tolaria_otel.cli``) prints it as one
line on stderr and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..config.otel_env import ConfigurationError

T = TypeVar("T")

PROG = "tolaria-otel"


class CommandError(Exception):
    """Bad input: reported as one line, exit status 2."""


def checked(build: Callable[[], T]) -> T:
    """``build()``, with the package's configuration errors turned into one-line command errors."""
    try:
        return build()
    except ValueError as error:  # SettingsError and ConfigurationError
        raise CommandError(str(error)) from None


def or_none(read: Callable[[], T]) -> T | None:
    """``read()``, or None where the value is bad (reported on its own)."""
    try:
        return read()
    except ConfigurationError:
        return None
