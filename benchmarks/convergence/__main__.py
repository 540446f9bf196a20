"""`python -m benchmarks.convergence ...`, or `python benchmarks/convergence ...` (the folder run as a script)."""

import sys
from pathlib import Path


if not __package__:  # run as a folder: make the repository root, not this folder, the import root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.convergence.cli import main


main()
