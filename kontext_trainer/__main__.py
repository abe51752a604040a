from kontext_trainer.cli import main

main()
