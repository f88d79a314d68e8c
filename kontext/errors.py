"""Exceptions the engine raises for user mistakes: each names the file, what was expected and what was found."""
from __future__ import annotations


class KontextError(Exception):
    """Base class of every error the engine raises on purpose (never a bug)."""


class CheckpointError(KontextError, ValueError):
    """A weights file or folder that is missing, damaged, of the wrong model kind or of an unsupported layout."""

    def __init__(self, path: object, problem: str, expected: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.expected = expected
        msg = f"{self.path}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class InputError(KontextError, ValueError):
    """A bad user input other than a checkpoint: an image, a size, a prompt, an option."""


class Cancelled(KontextError):
    """Raised from a callback to stop a run between steps."""
