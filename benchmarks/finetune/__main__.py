"""`python -m benchmarks.finetune ...`, or `python benchmarks/finetune ...` (the folder run as a script)."""

import sys
from pathlib import Path


if not __package__:  # run as a folder: make the repository root, not this folder, the import root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.finetune.cli import main


main()
