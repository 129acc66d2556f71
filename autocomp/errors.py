"""The one error type autocomp raises for bad user input; the CLI prints it as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AutocompError(Exception):
    """Base class of every error that autocomp reports to a user (exit code 2, no traceback)."""


class ConfigError(AutocompError, ValueError):
    """A YAML file, recipe, CLI argument or model broke a rule; the message names field, rule and value.

    ``field`` is the dotted name of the offending entry; config loaders prefix it with where the
    entry sits (``located``) so the user reads ``recipe.prune.layers.conv1.sparsity``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message, self.field = message, field
        self.file: str | None = None  # the file that holds the field, once named (``autocomp.config.in_file``)
        super().__init__(f"`{field}` {message}" if field else message)

    def located(self, prefix: str) -> ConfigError:
        return ConfigError(self.message, f"{prefix}.{self.field}" if self.field else prefix)


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_choice(field: str, value: object, choices: Iterable[object]) -> None:
    """Raise a ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, [str(c) for c in choices])
        raise ConfigError(f"must be one of {choices}, but got {value!r}.{hint}", field)


def check_range(field: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise a ConfigError unless ``low <= value <= high`` (``< high`` when ``high_open``)."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"must be in [{low}, {high}{bracket}, but got {value!r}.", field)
