"""The one base of every error that reports the problems found in one pass (each naming the file and the fix).

Every stage collects all the problems of its input before it raises, so a user fixes them in one go; the CLIs print
`problems` one per line (or as JSON) and pick the exit code from `usage`: True for a bad command line or a bad
input path (exit 2), False for problems found in the data (exit 1).
"""

from __future__ import annotations

from typing import Iterable


class ProblemsError(Exception):
    """An error carrying `problems`, one message each; `title` says what could not be done.

    `usage` tells the CLIs which exit code applies (see the module docstring); a subclass sets its default and a
    raise site may override it.
    """

    usage: bool = False

    def __init__(self, problems: str | Iterable[str], title: str | None = None, *, usage: bool | None = None,
                 message: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        self.title = title
        if usage is not None:
            self.usage = usage
        super().__init__(message if message is not None else self.format())

    def format(self) -> str:
        """`title:` then one `  - problem` line each; a single problem without a title is the bare message."""
        if self.title is None and len(self.problems) == 1:
            return self.problems[0]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.title}:\n{lines}" if self.title else lines
