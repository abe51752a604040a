"""The foundation both command lines stand on: consoles, exit codes, one error shape, progress, quiet libraries.

`kontext-data` and `kontext-train` import this module and nothing of each other's. It imports only rich (and typer
for `typer.Exit`), so `--help` stays fast.

- Exit codes: 0 ok, 1 problems found in the data or the run, 2 usage (bad options, a missing input).
- Errors: :func:`fail` prints every problem once, on stderr as ``error: ...`` lines (or a titled list), or with
  ``--json`` as one object on stdout: ``{"ok": false, "exit_code": N, "title": ..., "errors": [...]}``.
- Progress: :class:`ProgressView` draws rich bars with rate and ETA on a terminal; in a log (CI, ``nohup``, a file)
  it writes whole, throttled lines instead of a bar cut to 80 columns.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from kontext_data.problems import ProblemsError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
LOG_INTERVAL_S = 30.0
"""In a log, a progress line at most this often (plus one at every 25% and one at the end)."""

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def interactive(console: Console = err) -> bool:
    """True when `console` is a terminal (or KONTEXT_PROGRESS=1 forces bars, e.g. for a screen recording)."""
    return console.is_terminal or os.environ.get("KONTEXT_PROGRESS") == "1"


def quiet_libraries() -> None:
    """Hide what third-party libraries print that a user cannot act on (transformers' "requires torchvision"
    notices, diffusers/transformers download bars): our own progress and messages replace them.

    Cheap: sets the libraries' environment switches and warning filters; imports nothing heavy.
    """
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(f"{name}.utils.logging")
        if module is not None:  # already imported: the environment switches came too late for it
            module.set_verbosity_error()
            module.disable_progress_bar()


def print_json(data: Any) -> None:
    """One JSON document on stdout (what `--json` prints), UTF-8, indented."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def error_document(problems: list[str], code: int, title: str | None = None) -> dict[str, Any]:
    """The one JSON shape of a failed command."""
    return {"ok": False, "exit_code": code, "title": title, "errors": list(problems)}


def fail(problems: list[str] | str, code: int = EXIT_USAGE, *, json_out: bool = False, title: str | None = None,
         command: str | None = None) -> NoReturn:
    """Report every problem and exit with `code`.

    Text (stderr): ``title (N problem(s)):`` and one ``  - problem`` line each, or ``error: problem`` lines when there
    is no title; a usage error adds ``see: COMMAND --help``. With `json_out` the :func:`error_document` goes to stdout.
    """
    problems = [problems] if isinstance(problems, str) else list(problems)
    if json_out:
        print_json(error_document(problems, code, title))
    elif title:
        err.print(f"[bold red]{escape(title)}[/bold red] ({len(problems)} problem(s)):", highlight=False)
        for p in problems:
            err.print(f"  - {p}", markup=False, highlight=False)
    else:
        for p in problems:
            err.print(f"[red]error:[/red] {escape(p)}", highlight=False)
    if code == EXIT_USAGE and command and not json_out:
        err.print(f"see: {command} --help", highlight=False)
    raise typer.Exit(code)


def fail_with(exc: ProblemsError, *, json_out: bool = False, command: str | None = None,
              code: int | None = None) -> NoReturn:
    """:func:`fail` for a :class:`ProblemsError`: its problems, its title, and exit 2 when it is a usage error."""
    if code is None:
        code = EXIT_USAGE if exc.usage else EXIT_PROBLEMS
    fail(exc.problems, code, json_out=json_out, title=exc.title, command=command)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressView:
    """Progress of one command's tasks, by name: ``task(name, total)``, ``update(name, done, total, info)``.

    On a terminal: rich bars (description, bar, done/total, %, rate or `info`, elapsed, ETA). Elsewhere: whole lines
    ``text embeddings 24/96 25% 48.3 items/s elapsed 0:00:01 ETA 0:00:03``, at most every LOG_INTERVAL_S seconds,
    at each quarter and at the end, so a log shows progress without carriage-return noise or cut columns.
    `quiet` shows nothing; :meth:`line` prints a message above the bars either way (unless quiet).
    """

    def __init__(self, console: Console = err, *, quiet: bool = False, unit: str = "items",
                 interactive_: bool | None = None):
        self.console = console
        self.quiet = quiet
        self.unit = unit
        self.interactive = interactive(console) if interactive_ is None else interactive_
        self.bar = None
        self.tasks: dict[str, Any] = {}
        self.start: dict[str, float] = {}
        self.logged: dict[str, tuple[float, int]] = {}  # name -> (time of last line, quarter reached)

    def __enter__(self) -> "ProgressView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rich(self):
        if self.bar is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)
            self.bar.start()
        return self.bar

    def task(self, name: str, total: int | None = None) -> None:
        """Start the task `name` (once; later calls only update its total)."""
        if name in self.start:
            return
        self.start[name] = time.perf_counter()
        if self.quiet:
            return
        if self.interactive:
            self.tasks[name] = self._rich().add_task(name, total=total, info="")
        else:
            self.logged[name] = (self.start[name], -1)

    def update(self, name: str, done: int, total: int | None = None, info: str | None = None) -> None:
        """Task `name` has `done` of `total` items; `info` replaces the default rate text."""
        self.task(name, total)
        if self.quiet:
            return
        elapsed = max(time.perf_counter() - self.start[name], 1e-9)
        rate = done / elapsed
        text = info if info is not None else f"{rate:,.1f} {self.unit}/s"
        if self.interactive:
            self.bar.update(self.tasks[name], completed=done, total=total, info=text)
            return
        last, quarter = self.logged[name]
        now = time.perf_counter()
        q = int(4 * done / total) if total else -1
        finished = bool(total) and done >= total
        if not (finished or q > quarter or now - last >= LOG_INTERVAL_S):
            return
        self.logged[name] = (now, max(q, quarter))
        count = f"{done}/{total} {100 * done / total:.0f}%" if total else f"{done}"
        eta = (total - done) / rate if total and rate > 0 else None
        self.console.print(f"{name} {count} {text} elapsed {_clock(elapsed)}"
                           + ("" if finished or not total else f" ETA {_clock(eta)}"),
                           markup=False, highlight=False, soft_wrap=True)

    def line(self, text: str, *, markup: bool = True) -> None:
        """A message above the bars (rich markup allowed)."""
        if self.quiet:
            return
        (self.bar.console if self.bar is not None else self.console).print(text, markup=markup, highlight=False,
                                                                            soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run_with_progress(description: str, fn: Callable, *, quiet: bool = False, unit: str = "files"):
    """Call ``fn(on_progress)`` under one progress task; ``on_progress(done, total)`` updates it."""
    with ProgressView(quiet=quiet, unit=unit) as view:
        return fn(lambda done, total: view.update(description, done, total))
