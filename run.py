"""The original entry point: ``torchrun --nnodes 1 --nproc_per_node N run.py CONFIG [key=value ...]``.

The same as ``nbs train CONFIG``; kept so the paper's commands work unchanged.
"""

import sys

from noblankslate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
