"""User-facing errors: a message that names the file and a hint that says what to do.

The CLI prints these without a traceback (unless --debug) and exits with `exit_code`.
"""
from __future__ import annotations


class EdgepackError(Exception):
    """Bad input or environment. Exit code 2; nothing half-written is left behind."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BudgetNotMet(EdgepackError):
    """The artifact was built and reported, but a target budget failed. Exit code 1."""

    exit_code = 1


class MissingExtra(EdgepackError):
    """An optional dependency is not installed; the hint is the exact install command."""
