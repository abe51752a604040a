"""kontext_data.clikit, the foundation of both command lines: one error shape (text and JSON) with its exit codes,
progress as whole lines in a log, the quieted libraries, generated options, and the one `--json` of every command."""

from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any, Optional

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from kontext_data import clikit
from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, OptionSpec, ProgressView, fail, fail_with,
                                 generated_options, print_json)
from kontext_data.problems import ProblemsError


def _exit_code(fn, *args, **kwargs) -> int:
    with pytest.raises(typer.Exit) as exc:
        fn(*args, **kwargs)
    return exc.value.exit_code


def test_exit_codes():
    assert (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, clikit.EXIT_INTERRUPTED) == (0, 1, 2, 130)


def test_fail_text_lists_every_problem_on_stderr(capsys):
    assert _exit_code(fail, ["no such folder: a", "no such folder: b"], EXIT_USAGE, command="kontext-data pair") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["error: no such folder: a", "error: no such folder: b",
                                         "see: kontext-data pair --help"]
    assert _exit_code(fail, ["x is broken", "y is missing"], EXIT_PROBLEMS, title="cannot train") == 1
    assert capsys.readouterr().err.splitlines() == ["cannot train (2 problem(s)):", "  - x is broken",
                                                    "  - y is missing"]
    # a title that counts its problems itself is not counted twice; [brackets] are text, not markup
    assert _exit_code(fail, "a [dev] b", EXIT_USAGE, title="m.parquet: 1 problem(s)") == 2
    assert capsys.readouterr().err.splitlines() == ["m.parquet: 1 problem(s):", "  - a [dev] b"]


def test_fail_json_is_one_shape_on_stdout(capsys):
    assert _exit_code(fail, ["bad --match 'fuzzy'"], EXIT_USAGE, json_out=True, command="kontext-data pair") == 2
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out) == {"ok": False, "exit_code": 2, "title": None, "errors": ["bad --match 'fuzzy'"]}
    _exit_code(fail, "broken", EXIT_PROBLEMS, json_out=True, title="export a", indent=None,
               extra={"event": "error", "ok": True, "errors": []})  # extra keys never replace the four
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and json.loads(line) == {"ok": False, "exit_code": 1, "title": "export a",
                                                          "errors": ["broken"], "event": "error"}


def test_fail_with_takes_problems_title_and_exit_code_from_the_error(capsys):
    class DataProblem(ProblemsError):
        pass

    class BadOption(ProblemsError):
        usage = True

    assert _exit_code(fail_with, DataProblem(["a", "b"], "cannot pair"), json_out=True) == 1
    assert json.loads(capsys.readouterr().out) == {"ok": False, "exit_code": 1, "title": "cannot pair",
                                                   "errors": ["a", "b"]}
    assert _exit_code(fail_with, BadOption("--shard '5/2': K must be below N"), command="kontext-data degrade") == 2
    assert capsys.readouterr().err.splitlines() == ["error: --shard '5/2': K must be below N",
                                                    "see: kontext-data degrade --help"]
    assert _exit_code(fail_with, BadOption("x"), code=EXIT_PROBLEMS, title="used where the error has none") == 1
    assert "used where the error has none" in capsys.readouterr().err


def test_print_json_keeps_unicode_and_writes_json_lines(capsys):
    print_json({"caption": "café"})
    assert json.loads(capsys.readouterr().out)["caption"] == "café"
    print_json({"event": "step", "step": 1}, indent=None)
    assert capsys.readouterr().out == '{"event": "step", "step": 1}\n'


def _log() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=80), buffer  # a file, 80 columns: what CI and nohup give


def test_progress_in_a_log_is_whole_lines_at_each_quarter_and_the_end(monkeypatch):
    monkeypatch.setattr(clikit, "LOG_QUIET_S", 0.0)
    monkeypatch.setattr(clikit, "LOG_INTERVAL_S", 1e9)
    console, buffer = _log()
    name = "text embeddings of every caption in the three manifests given on the command line"
    assert len(name) > 80
    with ProgressView(console, unit="items") as view:
        assert not view.interactive
        for done in range(1, 97):
            view.update(name, done, 96)
    lines = buffer.getvalue().splitlines()
    assert [line.split()[len(name.split())] for line in lines] == ["1/96", "24/96", "48/96", "72/96", "96/96"]
    assert all(line.startswith(name + " ") and "\r" not in line and "…" not in line for line in lines)
    assert " 25% " in lines[1] and "items/s elapsed 0:00:" in lines[1] and " ETA " in lines[1]
    assert " 100% " in lines[-1] and "ETA" not in lines[-1]  # the end: no ETA left


def test_progress_of_a_short_task_in_a_log_is_its_last_line_only(monkeypatch):
    monkeypatch.setattr(clikit, "LOG_QUIET_S", 1e9)
    monkeypatch.setattr(clikit, "LOG_INTERVAL_S", 1e9)
    console, buffer = _log()
    with ProgressView(console, unit="img") as view:
        view.task("degrade", 32)
        for _ in range(32):
            view.advance("degrade")
        view.update("training", 5, 200, info="loss 0.1234 lr 1.00e-04 0.05s/step")
        view.update("split", 7, None)  # a streamed source: no total
        view.line("[cyan]a message[/cyan] between the lines")
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("degrade 32/32 100% ") and " img/s elapsed " in lines[0]
    assert lines[1] == "a message between the lines"
    # close() writes where the unfinished tasks stopped
    assert lines[2].startswith("training 5/200 2% loss 0.1234 lr 1.00e-04 0.05s/step elapsed ")
    assert lines[3].startswith("split 7 ") and " img/s elapsed " in lines[3]
    assert len(lines) == 4


def test_quiet_progress_prints_nothing_and_a_terminal_gets_bars():
    console, buffer = _log()
    with ProgressView(console, quiet=True) as view:
        view.update("x", 1, 2)
        view.line("hidden")
    assert buffer.getvalue() == ""
    terminal = Console(file=io.StringIO(), width=80, force_terminal=True)
    with ProgressView(terminal) as view:
        assert view.interactive
        view.update("x", 2, 2)
    assert "2/2" in terminal.file.getvalue()


def test_run_with_progress_returns_the_result():
    assert clikit.run_with_progress("Reading images", lambda cb: (cb(1, 2), cb(2, 2), "done")[-1], quiet=True) == "done"


def test_quiet_libraries_silences_what_users_cannot_act_on(monkeypatch):
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")  # a user's own choice stays
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clikit.quiet_libraries()
        warnings.warn("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        warnings.warn("a warning of ours")
    assert [str(w.message) for w in caught] == ["a warning of ours"]
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"


def test_generated_options_pass_only_what_was_given():
    specs = [OptionSpec("lora_rank", Optional[int], "LoRA rank [default: says the field].", shown_default="16"),
             OptionSpec("verify", bool, "Re-hash first.", ("--verify",), default=False),
             OptionSpec("vae_tiling", Optional[bool], "VAE tiling.", panel="Config keys"),
             OptionSpec("learning_rate", Optional[float], "Peak learning rate.", ("--learning-rate", "--lr"))]
    seen: list[dict[str, Any]] = []
    app = typer.Typer()

    @app.command()
    @generated_options(specs, into="values")
    def run(name: str = typer.Argument(...), *, values: dict[str, Any]) -> None:
        seen.append({"name": name, **values})

    runner = CliRunner()
    assert runner.invoke(app, ["a"]).exit_code == 0
    assert runner.invoke(app, ["b", "--lora-rank", "8", "--verify", "--no-vae-tiling", "--lr", "1e-3"]).exit_code == 0
    assert seen == [{"name": "a"},
                    {"name": "b", "lora_rank": 8, "verify": True, "vae_tiling": False, "learning_rate": 0.001}]
    bad = runner.invoke(app, ["c", "--lora-rank", "many"])
    assert bad.exit_code == 2
    text = runner.invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    assert "LoRA rank [default: says the field]. [default: 16]" in text and "Config keys" in text
    assert "--vae-tiling" in text and "--no-vae-tiling" in text and "--no-verify" not in text

    with pytest.raises(TypeError, match="clash"):
        generated_options(specs, into="values")(lambda lora_rank=1, values=None: None)


def _json_options(app: typer.Typer) -> dict[str, list[str]]:
    """command name -> the parameter names of its options spelled --json"""
    group = typer.main.get_command(app)
    return {name: [p.name for p in command.params if "--json" in getattr(p, "opts", ())]
            for name, command in group.commands.items()}


def test_every_json_option_is_one_option_stored_as_json_out():
    from kontext_data.cli import app as data_app
    from kontext_trainer.cli import app as train_app

    data = _json_options(data_app)
    assert set(data) == {"pair", "import-simpletuner", "degrade", "split", "inspect", "preview", "check"}
    train = _json_options(train_app)
    assert {"train", "export"} <= set(train)
    for name, params in {**data, **train}.items():
        assert params in ([], ["json_out"]), name
    assert all(params == ["json_out"] for params in data.values())


@pytest.mark.parametrize("args", [
    ["pair", "{tmp}/nowhere", "--match", "fuzzy", "--json"],
    ["degrade", "{tmp}", "--out", "{tmp}/o", "--json"],
    ["split", "{tmp}", "--out", "{tmp}/o", "--roles", "edit=0,edit=1", "--json"],
    ["inspect", "{tmp}/missing.parquet", "--json"],
    ["preview", "{tmp}/missing.parquet", "--out", "{tmp}/p.png", "--sort", "best", "--json"],
    ["check", "{tmp}/missing.parquet", "--json"],
    ["import-simpletuner", "{tmp}/backend.json", "--out", "{tmp}/o", "--path-map", "nonsense", "--json"],
])
def test_usage_errors_of_every_data_command_have_the_one_json_shape(tmp_path, args):
    from kontext_data.cli import app

    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)
    assert list(doc)[:4] == ["ok", "exit_code", "title", "errors"]
    assert doc["ok"] is False and doc["exit_code"] == 2 and doc["errors"] and all(doc["errors"])
