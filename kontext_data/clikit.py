"""The foundation both command lines stand on: consoles, exit codes, one error shape, progress, quiet libraries,
the shared `--json` option and options generated from a declaration table.

`kontext-data` and `kontext-train` import this module and nothing of each other's. It imports only rich and typer,
so `--help` stays fast.

- Exit codes: 0 ok, 1 problems found in the data or the run, 2 usage (bad options, a missing input), 130 interrupted.
- Errors: :func:`fail` prints every problem once, on stderr as ``error: ...`` lines (or a titled list), or with
  ``--json`` as one object on stdout: ``{"ok": false, "exit_code": N, "title": ..., "errors": [...]}``.
- Progress: :class:`ProgressView` draws rich bars with rate and ETA on a terminal; in a log (CI, ``nohup``, a file)
  it writes whole, throttled lines instead of a bar cut to 80 columns.
- Options: :func:`json_option` is the one ``--json``; :func:`generated_options` adds one typed option per
  :class:`OptionSpec` (made from a config's field metadata) to a command.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from kontext_data.problems import ProblemsError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
"""Ctrl-C: the shell's 128 + SIGINT; finished work is kept and the same command resumes."""
LOG_INTERVAL_S = 30.0
"""In a log, a progress line at most this often (plus one at every 25% and one at the end)."""
LOG_QUIET_S = 2.0
"""In a log, a task shorter than this shows only its final line (no quarter lines a second apart)."""

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


def print_json(data: Any, *, indent: int | None = 2) -> None:
    """One JSON document on stdout (what `--json` prints), UTF-8; `indent=None` writes it as one line (JSON lines:
    `kontext-train`'s events)."""
    sys.stdout.write(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def error_document(problems: list[str], code: int, title: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON shape of a failed command: ``ok``, ``exit_code``, ``title``, ``errors``, then any `extra` keys
    a command adds (they never replace those four)."""
    doc = {"ok": False, "exit_code": code, "title": title, "errors": list(problems)}
    doc.update({k: v for k, v in (extra or {}).items() if k not in doc})
    return doc


def fail(problems: list[str] | str, code: int = EXIT_USAGE, *, json_out: bool = False, title: str | None = None,
         command: str | None = None, extra: dict[str, Any] | None = None, indent: int | None = 2) -> NoReturn:
    """Report every problem and exit with `code`.

    Text (stderr): ``title (N problem(s)):`` (the count left out when the title gives it) and one ``  - problem``
    line each, or ``error: problem`` lines when there is no title; a usage error adds ``see: COMMAND --help``.
    With `json_out` the :func:`error_document` (with `extra`) goes to stdout instead, indented by `indent` (None:
    one line).
    """
    problems = [problems] if isinstance(problems, str) else list(problems)
    if json_out:
        print_json(error_document(problems, code, title, extra), indent=indent)
    elif title:
        count = "" if "problem" in title else f" ({len(problems)} problem(s))"  # titles that count their own
        err.print(f"[bold red]{escape(title)}[/bold red]{count}:", highlight=False)
        for p in problems:
            err.print(f"  - {p}", markup=False, highlight=False)
    else:
        for p in problems:
            err.print(f"[red]error:[/red] {escape(p)}", highlight=False)
    if code == EXIT_USAGE and command and not json_out:
        err.print(f"see: {command} --help", highlight=False)
    raise typer.Exit(code)


def fail_with(exc: ProblemsError, *, json_out: bool = False, command: str | None = None,
              code: int | None = None, title: str | None = None, extra: dict[str, Any] | None = None,
              indent: int | None = 2) -> NoReturn:
    """:func:`fail` for a :class:`ProblemsError`: its problems, its title (or `title` where it has none), and exit 2
    when it is a usage error (unless `code` says otherwise)."""
    if code is None:
        code = EXIT_USAGE if exc.usage else EXIT_PROBLEMS
    fail(exc.problems, code, json_out=json_out, title=exc.title or title, command=command, extra=extra,
         indent=indent)


def interrupted(message: str) -> NoReturn:
    """Ctrl-C: say what was kept (`message`) and exit with :data:`EXIT_INTERRUPTED`."""
    err.print(f"[yellow]interrupted[/yellow]: {escape(message)}", highlight=False)
    raise typer.Exit(EXIT_INTERRUPTED)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressView:
    """Progress of one command's tasks, by name: ``task(name, total)``, ``update(name, done, total, info)``.

    On a terminal: rich bars (description, bar, done/total, %, rate or `info`, elapsed, ETA). Elsewhere: whole lines
    ``text embeddings 24/96 25% 48.3 items/s elapsed 0:00:01 ETA 0:00:03``, at most every LOG_INTERVAL_S seconds and
    at each quarter (a task shorter than LOG_QUIET_S only at its end), so a log shows progress without
    carriage-return noise or cut columns; :meth:`close` writes the last state of a task that did not reach its total.
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
        self.unlogged: dict[str, str] = {}  # name -> its latest line, not written yet (log mode)
        self.counts: dict[str, tuple[int, int | None]] = {}  # name -> (done, total) last reported

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
        self.counts[name] = (0, total)
        if self.quiet:
            return
        if self.interactive:
            self.tasks[name] = self._rich().add_task(name, total=total, info="")
        else:
            self.logged[name] = (self.start[name], -1)

    def update(self, name: str, done: int, total: int | None = None, info: str | None = None) -> None:
        """Task `name` has `done` of `total` items; `info` replaces the default rate text."""
        self.task(name, total)
        self.counts[name] = (done, total)
        if self.quiet:
            return
        now = time.perf_counter()
        elapsed = max(now - self.start[name], 1e-9)
        rate = done / elapsed
        text = info if info is not None else f"{rate:,.1f} {self.unit}/s"
        if self.interactive:
            self.bar.update(self.tasks[name], completed=done, total=total, info=text)
            return
        last, quarter = self.logged[name]
        q = int(4 * done / total) if total else -1
        finished = bool(total) and done >= total
        count = f"{done}/{total} {100 * done / total:.0f}%" if total else f"{done}"
        eta = (total - done) / rate if total and rate > 0 else None
        line = (f"{name} {count} {text} elapsed {_clock(elapsed)}"
                + ("" if finished or not total else f" ETA {_clock(eta)}"))
        due = now - last >= LOG_INTERVAL_S or (q > quarter and elapsed >= LOG_QUIET_S)
        if quarter == 4 or not (finished or due):  # quarter 4: its final line is written already
            self.unlogged[name] = line
            return
        self.logged[name] = (now, 4 if finished else max(q, quarter))
        self.unlogged.pop(name, None)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def advance(self, name: str, step: int = 1) -> None:
        """`step` more items of task `name` done (its total as given to :meth:`task` or the last update)."""
        self.task(name)
        done, total = self.counts[name]
        self.update(name, done + step, total)

    def line(self, text: str, *, markup: bool = True) -> None:
        """A message above the bars (rich markup allowed)."""
        if self.quiet:
            return
        (self.bar.console if self.bar is not None else self.console).print(text, markup=markup, highlight=False,
                                                                            soft_wrap=True)

    def close(self) -> None:
        """Stop the bars; in a log, write the last state of each task whose last update was not written."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        for name in list(self.unlogged):
            if self.logged.get(name, (0.0, -1))[1] < 4:
                self.console.print(self.unlogged[name], markup=False, highlight=False, soft_wrap=True)
        self.unlogged.clear()


def run_with_progress(description: str, fn: Callable, *, quiet: bool = False, unit: str = "files"):
    """Call ``fn(on_progress)`` under one progress task; ``on_progress(done, total)`` updates it."""
    with ProgressView(quiet=quiet, unit=unit) as view:
        return fn(lambda done, total: view.update(description, done, total))


# ------------------------------------------------------------------------------------------------ options


def json_option(help: str = "Print the result as JSON on stdout instead of the summary.") -> Any:
    """The one `--json` option (every command stores it as `json_out`); `help` says what that command prints."""
    return typer.Option(False, "--json", help=help)


@dataclass(frozen=True)
class OptionSpec:
    """One generated option: a config field (or parameter) `name`, its Python `type` (e.g. ``Optional[int]``),
    `help` (plain text, not markup), and its command-line spelling.

    `flags`: the declarations (default ``--name-with-dashes``; a bool gets ``--x/--no-x`` unless its flags say
    otherwise, e.g. ``("--verify",)`` for an on-only flag). `default` is the "not given" value: None, or False for
    an on-only flag. `shown_default` is the real default, shown in --help (None: none shown). `panel` groups the
    option under its own heading in --help.
    """

    name: str
    type: Any
    help: str
    flags: tuple[str, ...] = ()
    default: Any = None
    shown_default: str | None = None
    panel: str | None = None

    def declarations(self) -> tuple[str, ...]:
        """The option's spellings, as Typer takes them."""
        if self.flags:
            return self.flags
        long = "--" + self.name.replace("_", "-")
        is_bool = self.type is bool or self.type == Optional[bool]
        return (f"{long}/--no-{long[2:]}",) if is_bool else (long,)

    def parameter(self) -> inspect.Parameter:
        """The keyword parameter Typer reads this option from."""
        text = self.help + (f" [default: {self.shown_default}]" if self.shown_default is not None else "")
        option = typer.Option(self.default, *self.declarations(), help=escape(text), show_default=False,
                              rich_help_panel=self.panel)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=self.type)


def generated_options(specs: Sequence[OptionSpec], *, into: str) -> Callable[[Callable], Callable]:
    """Decorate a Typer command so that it also takes one option per spec; the command receives the options the
    user gave (value not the spec's "not given" default) as one dict, in its parameter `into`.

    The option table is declared once (from a config's field metadata) instead of once per command parameter, and
    the command body stays short: ``@app.command()`` then ``@generated_options(SPECS, into="values")``.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
               if p.name != into]
        clash = {p.name for p in own} & {s.name for s in specs}
        if clash:
            raise TypeError(f"{fn.__name__}: generated options clash with its parameters: {sorted(clash)}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {}
            for spec in specs:
                value = kwargs.pop(spec.name)
                if value is not None and value != spec.default:
                    given[spec.name] = value
            return fn(**kwargs, **{into: given})

        command.__signature__ = signature.replace(parameters=own + [s.parameter() for s in specs])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate
