"""The ``jtml`` command: one module per sub-command (:mod:`jtml.cli.main` dispatches)."""

from jtml.cli.main import main

__all__ = ["main"]
