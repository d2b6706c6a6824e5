"""python -m trainer.export: the export command (its subcommands: trainer.export.main)."""
import sys

from trainer.export import main

sys.exit(main())
