"""Progress bars that behave in log files: tqdm redraws at most every 30 s when stderr is not a
terminal (SLURM, nohup, `> log 2>&1`), instead of ten times a second."""
from __future__ import annotations

import sys

LOG_FILE_INTERVAL_S = 30.0


def progress_bar(**kwargs):
    """`tqdm(**kwargs)` with `mininterval` chosen for the output (explicit values win)."""
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else LOG_FILE_INTERVAL_S)
    if not interactive:
        kwargs.setdefault("maxinterval", max(kwargs["mininterval"], 60.0))
    return tqdm(**kwargs)
