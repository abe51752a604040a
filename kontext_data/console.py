"""The `kontext-data` console script: a module that imports nothing until it runs.

Worker processes started with the `spawn` method re-import the script's main module; pointing the script here
instead of at `kontext_data.cli` spares every worker the import of Typer, rich and the command modules.
"""


def main() -> None:
    from kontext_data.cli import main as cli_main

    cli_main()
