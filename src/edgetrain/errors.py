"""The errors edgetrain raises for what a user gave it, apart from its own bugs.

``ConfigError`` is a ``ValueError`` whose message says what was wrong, the value, and
what to do: an invalid recipe field, a recipe that cannot run on this model, a file that
is not what it should be. The command line prints these (and only these, with unknown
names and missing files) as one line; anything else is a bug in edgetrain and shows its
traceback. Being a ``ValueError``, it is caught by code written against the plain one.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ConfigIndexError"]


class ConfigError(ValueError):
    """A value the user gave cannot work; the message names it and what to do."""


class ConfigIndexError(ConfigError, IndexError):
    """A user-given index (a block, a cut) outside the model's range."""
