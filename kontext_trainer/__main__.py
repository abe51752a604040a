"""`python -m kontext_trainer ...` is `kontext-train ...` (what `--num-processes` launches in every process)."""

from kontext_trainer.cli import main

main()
