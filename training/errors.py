"""Errors that stop a training run with one line for the user (train.py prints them on rank 0;
the loop also writes them to the run's log.txt)."""

from utils.atomic import describe_write_error  # noqa: F401 - where the loop has always imported it


class ConfigError(ValueError):
    """A problem the user can fix in the config or the data; the message says what to change."""


class TrainingStopped(RuntimeError):
    """The run stopped for a reason the message explains; earlier checkpoints are intact."""


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN/inf; no checkpoint was written after that step."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint (or another run output) could not be written: disk full, quota, permissions."""


class CorruptDataError(TrainingStopped):
    """A training sample is corrupt and `bad_samples=error`; the message names the file."""
