"""Errors that are a user's mistake: the CLI prints them as one line, with exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot work as written (a value out of range, options that contradict each other,
    data that lacks what the run needs). ``str(err)`` is the whole message, on one line."""


__all__ = ["ConfigError"]
