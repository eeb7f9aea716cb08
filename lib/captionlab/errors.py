"""Errors the user can act on: each message names the file and the problem."""

from __future__ import annotations


class CaptionlabError(Exception):
    """Base class; the CLI prints these as one line and exits 2."""


class DataError(CaptionlabError, ValueError):
    """A data file (annotations, predictions, CSV, params) is malformed."""


class ImageLoadError(CaptionlabError, OSError):
    """An image file cannot be opened or decoded."""


class ConfigError(CaptionlabError, ValueError):
    """A params file or option is invalid."""


class BudgetError(CaptionlabError, ValueError):
    """A model exceeds its trainable-parameter budget."""


class MissingInputError(CaptionlabError, FileNotFoundError):
    """A notebook needs another notebook's output: the message is one line naming the notebook to run first."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: the one line that says what to do."""
        return [f"{type(self).__name__}: {self}"]
