"""Errors that stop a training run with one line for the user (train.py prints them on rank 0;
the loop also writes them to the run's log.txt)."""


class TrainingStopped(RuntimeError):
    """The run stopped for a reason the message explains; earlier checkpoints are intact."""


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN/inf; no checkpoint was written after that step."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint (or another run output) could not be written: disk full, quota, permissions."""


class CorruptDataError(TrainingStopped):
    """A training sample is corrupt and `bad_samples=error`; the message names the file."""


def describe_write_error(error: BaseException) -> str:
    """A short reason for a failed write: `[Errno 28] No space left on device`, or torch's
    zip-writer failures (`unexpected pos`, `file write failed`) named as what they mean."""
    if isinstance(error, OSError):
        return f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "unexpected pos" in text or "write failed" in text or "inline_container" in text:
        return "the write failed part-way (disk full or quota exceeded?)"
    return text[:200]
