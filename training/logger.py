"""Run logging: a log file + console (rank 0), and optionally wandb or tensorboard through
accelerate's trackers (`accelerate.tracking.WandBTracker`, `TensorBoardTracker`: their `start`,
`store_init_configuration`, `log`, `log_images`, `finish`), started here after the run folder is
locked rather than by `Accelerator(log_with=...)` at process start, so that the choices below are
made once and a tracker's failure is always caught.

A tracker that cannot start (wandb without an API key or network, tensorboard not installed)
never stops training: it prints a warning and the run continues with the log file only
(wandb online without an API key falls back to offline mode, so the metrics are still kept
locally and can be uploaded later with `wandb sync`).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import time
from typing import Optional
from urllib.parse import urlparse

import numpy as np

from utils.atomic import atomic_write
from utils.regular_files import open_regular, read_regular


def _warn(log: logging.Logger, msg: str) -> None:
    log.warning(msg)


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class _TqdmHandler(logging.Handler):
    """Console output that does not break an active tqdm bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def setup_file_logger(exp_dir: Optional[str], is_main: bool, name: str = "train") -> logging.Logger:
    """Logger writing to `<exp_dir>/log.txt` and stdout on the main process; silent elsewhere."""
    log = logging.getLogger(f"dfm.{name}")
    log.handlers.clear()
    log.propagate = False
    if not is_main:
        log.addHandler(logging.NullHandler())
        log.setLevel(logging.WARNING)
        return log
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if exp_dir is not None:
        os.makedirs(exp_dir, exist_ok=True)
        handler = LogFileHandler(os.path.join(exp_dir, "log.txt"))
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


class LogFileHandler(logging.FileHandler):
    """log.txt: opened as a regular file of the run folder (a link or FIFO under the name is refused,
    utils/regular_files.py); a write that fails (disk full) is one warning line on stderr, once,
    instead of logging's traceback after every record; the console keeps the messages."""

    _warned = False

    def _open(self):
        return open_regular(self.baseFilename, self.mode, encoding=self.encoding)

    def handleError(self, record):
        if not self._warned:
            self._warned = True
            error = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename}: {error}; messages go to the console only",
                  file=sys.stderr, flush=True)


def open_records(path: str):
    """A JSON-lines file opened for appending (a regular file, no link followed), a last line cut short
    by a crash removed first: readers skip such a line, but the next record would be glued to it."""
    import io

    f = open_regular(path, "a+b")
    size = f.seek(0, os.SEEK_END)
    if size:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
    return io.TextIOWrapper(f, encoding="utf-8")


class RunLogger:
    """Metrics and images to the log file and the chosen tracker (main process only)."""

    def __init__(self, exp_dir: str, log: logging.Logger, report_to: str = "none", is_main: bool = True,
                 config: Optional[dict] = None, project: str = "dfm-sit", run_name: Optional[str] = None,
                 wandb_mode: Optional[str] = None):
        self.exp_dir = exp_dir
        self.log = log
        self.is_main = is_main
        self.kind = "none"
        self._tracker = None  # an accelerate tracker (accelerate.tracking), started
        self._metrics_file = None
        if not is_main:
            return
        self._metrics_file = open_records(os.path.join(exp_dir, "metrics.jsonl"))
        if report_to == "wandb":
            self._start(self._wandb_tracker(project, run_name, wandb_mode), config)
        elif report_to == "tensorboard":
            self._start(self._tensorboard_tracker(), None)  # its hparams take no nested config

    def _wandb_tracker(self, project, run_name, mode):
        """accelerate's WandBTracker, offline without an API key, resuming this folder's wandb run."""
        try:
            import wandb  # noqa: F401 - installed?
        except ImportError:
            _warn(self.log, "report_to=wandb but wandb is not installed (pip install wandb); "
                            "logging to the log file only")
            return None
        mode = mode or os.environ.get("WANDB_MODE") or "online"
        if mode == "disabled":
            self.log.info("wandb disabled (wandb_mode=disabled)")
            return None
        if mode == "online" and not wandb_api_key_available():
            _warn(self.log, "wandb: no API key found (run `wandb login` or set WANDB_API_KEY); logging "
                            "offline instead: upload later with `wandb sync " + os.path.join(self.exp_dir, "wandb") + "`")
            mode = "offline"
        try:
            run_id = read_regular(self._id_file, 1024, "wandb run id file").decode("utf-8", "replace").strip() or None
        except FileNotFoundError:
            run_id = None
        except (OSError, ValueError) as e:  # a link or FIFO under the name, or not an id: a new wandb run
            _warn(self.log, f"WARNING: {e}; starting a new wandb run")
            run_id = None
        from accelerate.tracking import WandBTracker

        self._wandb_mode = mode
        return WandBTracker(project, name=run_name, dir=self.exp_dir, mode=mode, id=run_id, resume="allow")

    def _tensorboard_tracker(self):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except (ImportError, ModuleNotFoundError):
            _warn(self.log, "report_to=tensorboard but the tensorboard package is not installed "
                            "(pip install tensorboard); logging to the log file only")
            return None
        from accelerate.tracking import TensorBoardTracker

        return TensorBoardTracker("tensorboard", self.exp_dir)  # events in <run>/tensorboard

    @property
    def _id_file(self) -> str:
        return os.path.join(self.exp_dir, "wandb_run_id.txt")

    def _start(self, tracker, config) -> None:
        """Start an accelerate tracker (and store the run config in it); any failure: a warning, no tracker."""
        if tracker is None:
            return
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its state (the run's Accelerator made it already)
        try:
            tracker.start()
            if config is not None:
                tracker.store_init_configuration(config)
        except Exception as e:  # network, auth, anything: never stop training for the tracker
            _warn(self.log, f"{tracker.name} failed to start ({type(e).__name__}: {e}); logging to the log file only")
            return
        self._tracker, self.kind = tracker, tracker.name
        if tracker.name == "wandb":
            run = tracker.tracker
            try:
                with atomic_write(self._id_file, "w") as f:
                    f.write(run.id)
            except Exception:
                pass
            self.log.info(f"wandb run {run.id} ({self._wandb_mode})")

    def _safely(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            _warn(self.log, f"{self.kind} {what} failed ({type(e).__name__}: {e}); continuing without it")
            self._tracker = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self._metrics_file.flush()
        if self._tracker is not None:
            self._safely("logging", lambda: self._tracker.log(metrics, step=step))

    def log_image(self, name: str, image: np.ndarray, step: int, caption: str = "") -> None:
        """`image`: (H, W, 3) uint8 (the caption goes to wandb; tensorboard shows the step)."""
        if not self.is_main or self._tracker is None:
            return
        if self.kind == "wandb":
            import wandb

            self._safely("image logging", lambda: self._tracker.log({name: wandb.Image(image, caption=caption)}, step=step))
        else:
            self._safely("image logging", lambda: self._tracker.log_images({name: image[None]}, step=step,
                                                                           dataformats="NHWC"))

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tracker is not None:
            self._safely("closing", self._tracker.finish)
        self._tracker = None


def log_error_to_file(message: str, exc_info=None, name: str = "train") -> None:
    """Write an error that stops the run into log.txt only (the console line is train.py's, so
    the user sees it once); a no-op before the run's logger exists or on non-main ranks."""
    log = logging.getLogger(f"dfm.{name}")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
