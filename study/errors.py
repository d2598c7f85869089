"""User-facing errors.

Everything a user can get wrong (a typo in a search-space key, a missing dataset, an out-of-range
threshold, a changed space on resume) raises :class:`UserError`. The CLI prints its message as one
line and exits with code 2, without a traceback. Code below the CLI raises it as early as the
mistake can be detected, before anything is written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input, reported as one line with exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration value.

    ``key`` is the dotted path of the offending value (``stage2.maxnorm_threshold``); the YAML
    loader prefixes the file name so the final message names file, key and problem.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def at(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key."""
        key = f"{prefix}.{self.key}" if prefix and self.key else (prefix or self.key)
        return ConfigError(key, self.message)


class StudyInterrupted(Exception):
    """A study stopped before finishing (Ctrl-C, a signal); running the same command resumes it."""

    exit_code = 130


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``word`` among ``choices``, or None."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown(kind: str, word: str, choices: Iterable[str]) -> str:
    """A message for an unknown name: the suggestion (if any) and the valid choices."""
    choices = sorted(choices)
    guess = nearest(word, choices)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    return f"unknown {kind} '{word}'{hint}; valid: {', '.join(choices)}"
