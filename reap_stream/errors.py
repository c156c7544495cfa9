"""The one error type for bad input: the CLI turns it into exit code 2 and one line."""
from __future__ import annotations

from pathlib import Path


class BadInput(Exception):
    """Input the tool refuses: `where` names the file (or option), `what` the fault."""

    def __init__(self, where: str | Path, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")
