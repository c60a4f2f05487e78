"""Small helpers of the command-line entry points."""
from __future__ import annotations

import os
import sys


def print_text(text: str) -> int:
    """Print `text` to stdout and return 0; a reader that stops early (`train.py --help | head`)
    is not an error: no BrokenPipeError traceback, not even at interpreter exit."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush at exit would raise again
    return 0
