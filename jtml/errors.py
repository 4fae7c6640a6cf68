"""One error type for bad input, so every entry point can report it the same way.

The CLI catches :class:`JTMLError`, prints ``error: <file>: <problem>`` and exits with code 2;
library callers get an exception that names the file instead of a deep traceback.
"""

from __future__ import annotations

from os import PathLike


class JTMLError(Exception):
    """Bad input: names the offending file (when there is one) and the problem."""

    def __init__(self, message: str, path: str | PathLike | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)
