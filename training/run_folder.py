"""The experiment folder of a training run: the run owns it, and this piece is what owns it.

`<output_dir>/<exp_name>/` holds `run.lock` (the holder: host, process, start time), `log.txt`,
`config.yaml` (the config of the latest start), `configs/` (the config of every start, named by
the step it started from), `checkpoints/` (verified, pruned here), `weights/` (exported
`.safetensors`), `metrics.jsonl`, previews and the rest. Rank 0 writes; the other ranks learn of
an error through a collective and stop with the same line.

One run at a time: `run.lock` is created and `flock`ed by rank 0 before anything else is written
(a second run on the same folder gets one line naming the holder, and writes nothing). The lock
of a process that died (kill -9, a crashed node) is released by the kernel with the process; a
lock file naming a dead process of this host is taken over with one line. Another host's lock is
never taken over (its process cannot be checked from here): the line says how to remove it.

Resuming with other settings than the checkpoint's run is allowed for everything but the
architecture (an error in `training.setup`): the change is logged as one warning line naming
each key (old -> new), and the earlier config stays in `configs/`.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from omegaconf import OmegaConf

from training.checkpoint import atomic_torch_save, checkpoint_path, list_checkpoints, prune_checkpoints
from training.errors import CheckpointWriteError, ConfigError, TrainingStopped, describe_write_error
from training.logger import setup_file_logger
from utils.config import MAX_CONFIG_BYTES, canonical_values, config_to_dict, mapping_valued_keys, save_config
from utils.records import RecordError, read_record
from utils.regular_files import NotRegularFile, check_regular, is_regular_file, open_regular, read_regular

LOCK_NAME = "run.lock"
# the files of a run folder this code reads or appends to (checked at the start: regular files only)
RUN_FILES = ("log.txt", "metrics.jsonl", "bad_samples.json", "config.yaml", "wandb_run_id.txt")

CONFIGS = "configs"
# keys whose change on resume says nothing about the run (paths of the run itself, workers, logging)
NOT_COMPARED = ("resume", "cpu_threads", "num_workers", "output_dir", "exp_name", "report_to", "wandb_project",
                "wandb_mode", "make_demo_data")


class RunLocked(ConfigError):
    """Another live run holds the experiment folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def acquire_lock(exp_dir: str):
    """`(file object holding the flock, takeover line or None)` for `<exp_dir>/run.lock`; RunLocked
    when a live run holds it, NotRegularFile when something else than a regular file has the name.
    The caller keeps the file open for the length of the run and ends it with :func:`release_lock`.

    The holder removes the file when it ends (:func:`release_lock`), so a process that opened the old
    file just before may win the flock on a file that no longer has the name, while a third process
    creates and locks a new one: the lock is held only once the file locked is, by inode, the file at
    the name (checked after locking; otherwise the attempt starts again)."""
    path = os.path.join(exp_dir, LOCK_NAME)
    for _ in range(_LOCK_ATTEMPTS):
        f = open_regular(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLocked(f"{exp_dir} is in use by another run ({_holder(path)}); wait for it to finish, or choose "
                            "another exp_name / output_dir") from None  # the flock: that process is alive
        if _same_file(f, path):
            break
        f.close()  # locked a file its holder had just removed: try the one at the name now
    else:
        raise RunLocked(f"{exp_dir}: {path} kept changing while this run tried to lock it ({_LOCK_ATTEMPTS} attempts); "
                        "is another program removing it? Start again")
    info, line, here = _lock_info(path), None, socket.gethostname()
    if info is not None:
        if info.get("host") not in (None, here):
            f.close()
            raise RunLocked(f"{exp_dir} is locked by a run on another machine ({_holder(path)}), which cannot be "
                            f"checked from {here}; if that run is gone, delete {path} and start again")
        if isinstance(info.get("pid"), int) and info["pid"] != os.getpid() and _alive(info["pid"]):
            f.close()  # a file system without working flock, or the pid now belongs to another program
            raise RunLocked(f"{exp_dir} is in use by another run ({_holder(path)}); wait for it to finish, or choose "
                            f"another exp_name / output_dir (if that run is gone, delete {path})")
        line = f"took over {path} from a run that is no longer running ({_holder(path)})"
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": here, "pid": os.getpid(),
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "command": " ".join(sys.argv)[:500]}) + "\n")
    f.flush()
    return f, line


_LOCK_ATTEMPTS = 100
_MAX_LOCK_BYTES = 64 << 10  # ours hold one line of JSON


def _same_file(f, path: str) -> bool:
    """Whether the open file `f` is (by device and inode) the file at `path` now."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def release_lock(f, exp_dir: str) -> None:
    """End the hold of `acquire_lock`'s file `f`: remove the lock file (while still holding the flock,
    so that no other process locks it in between) and close it. The name is removed only while it is
    still this file."""
    path = os.path.join(exp_dir, LOCK_NAME)
    try:
        if _same_file(f, path):
            os.remove(path)
    except OSError:
        pass
    f.close()


def _lock_info(path: str) -> Optional[dict]:
    """The holder recorded in a lock file: None when empty, {} when unreadable."""
    try:
        text = read_regular(path, _MAX_LOCK_BYTES, "lock file").decode("utf-8").strip()
        info = json.loads(text) if text else None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) or info is None else {}


def _holder(path: str) -> str:
    """'host H, process P, since T' (or what is known) of a lock file."""
    info = _lock_info(path) or {}
    if "host" not in info or "pid" not in info:
        return "holder unknown"
    return f"host {info['host']}, process {info['pid']}, since {info.get('started', '?')}"


class RunFolder:
    """The experiment folder, held by this run: the lock, the log, the config versions, checkpoints.

    `RunFolder(cfg, exp_dir, accelerator, gather)` creates the folder and takes the lock (rank 0),
    then opens the log; `close()` (or the `with` block) releases the lock. `gather(obj)` returns the
    objects of every rank (a collective), so an error seen by rank 0 stops every rank.
    """

    def __init__(self, cfg, exp_dir: str, accelerator, gather):
        self.cfg, self.exp_dir, self.gather = cfg, exp_dir, gather
        self.is_main = accelerator.is_main_process
        self._lock = None
        self._reported: set = set()  # files already named in a "left alone" warning
        error, takeover = None, None
        if self.is_main:
            try:
                os.makedirs(exp_dir, exist_ok=True)
                self._lock, takeover = acquire_lock(exp_dir)
                check_regular(os.path.join(exp_dir, name) for name in RUN_FILES)
            except RunLocked as e:
                error = e
            except OSError as e:
                error = run_folder_error(cfg, exp_dir, e)
        try:
            self._raise_shared(error)  # before anything is written: a refused run leaves no trace
            self.log = open_run_log(cfg, exp_dir, accelerator.is_main_process, gather)
        except BaseException:
            self.close()  # the `with` block never started: release the lock here
            raise
        if takeover:
            self.log.warning(f"WARNING: {takeover}")

    def _raise_shared(self, error) -> None:
        """Raise rank 0's error on every rank (the others get the same message)."""
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise errors[0]

    def on_main(self, fn):
        """`fn()` on rank 0 only; whatever stops it there stops every rank at once (a collective
        instead of a barrier, so no rank waits for a process that is gone until the launcher's
        timeout): rank 0 raises its error, the others TrainingStopped with its message."""
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - shared, then raised unchanged on rank 0
                error = e
        messages = [m for m in self.gather(None if error is None else f"{error}") if m]
        if error is not None:
            raise error
        if messages:
            raise TrainingStopped(f"stopped with rank 0: {messages[0]}")
        return result

    def close(self) -> None:
        """Release the lock and remove the lock file (at the end of the run, also after an error)."""
        if self._lock is not None:
            release_lock(self._lock, self.exp_dir)
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, writer, *args):
        """`writer(*args)` on rank 0 (an output of the run: a snapshot, a record), its write errors one
        line naming the file (atomic writes attach it to the error) and what is kept."""
        from safetensors import SafetensorError  # what safetensors' file writer raises on a full disk

        try:
            return writer(*args)
        except (OSError, RuntimeError, SafetensorError) as e:
            what = getattr(e, "filename", None) or f"the {getattr(writer, '__name__', 'output')} of {self.exp_dir}"
            raise CheckpointWriteError(f"cannot write {what}: {describe_write_error(e)}; "
                                       f"{self.checkpoints_kept()}") from None

    def checkpoints_kept(self) -> str:
        """What a failed write leaves: 'the last checkpoint <path> is intact' or 'no checkpoint was written yet'."""
        found = list_checkpoints(self.exp_dir)
        return f"the last checkpoint {found[-1][1]} is intact" if found else "no checkpoint was written yet"

    def record_config(self, cfg, start_step: int, previous: Optional[dict]) -> None:
        record_config(cfg, self.exp_dir, start_step, previous, self.log, self.is_main, self.gather)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, payload: dict, last_good: Optional[str], resumed_step: Optional[int],
                        export: Optional[dict] = None) -> str:
        """Rank 0: write checkpoint `payload` (atomically, with its checksum), the exported weights
        (`export`: {"ema": ..., "model": ...} state dicts, `save_format: safetensors`), then prune
        to `checkpoints_total_limit` (never the checkpoint just written nor the newest intact one);
        an error stops every rank with one line. Returns the checkpoint's path."""
        path = checkpoint_path(self.exp_dir, payload["steps"])
        self.on_main(lambda: self._write(payload, path, last_good, resumed_step, export))
        return path

    def _write(self, payload, path, last_good, resumed_step, export) -> None:
        step = payload["steps"]
        if resumed_step is not None and step <= resumed_step:
            raise CheckpointWriteError(f"refusing to write checkpoint {path} for step {step}: this run "
                                       f"resumed at step {resumed_step} and writes only later steps")
        kept = f"the last good checkpoint {last_good} is intact" if last_good else "no earlier checkpoint exists"
        try:
            atomic_torch_save(payload, path)
        except (OSError, RuntimeError) as e:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {describe_write_error(e)}; {kept}") from None
        if export is not None:
            from models.weights_io import export_weights

            weights = exported_weights_path(self.exp_dir, step)
            try:
                os.makedirs(os.path.dirname(weights), exist_ok=True)
                export_weights(weights, export, arch=payload["arch"], config=payload["config"], steps=step)
            except (OSError, RuntimeError) as e:
                raise CheckpointWriteError(f"cannot write exported weights {weights}: {describe_write_error(e)}; "
                                           f"the checkpoint {path} is intact") from None
        pruned = prune_checkpoints(self.exp_dir, self.cfg.checkpoints_total_limit, protect=path)
        self._prune_exported_weights()
        new = [p for p in pruned.left_alone if p not in self._reported]
        if new:
            self._reported.update(new)
            self.log.warning(f"WARNING: left alone in {os.path.dirname(path)} (not intact checkpoints of this run, "
                             f"never pruned or read): {', '.join(os.path.basename(p) for p in new)}")
        self.log.info(f"saved checkpoint {path}" + (f" (removed {len(pruned)} old)" if pruned.removed else ""))

    def _prune_exported_weights(self) -> None:
        """Exported weights follow their checkpoints out (checkpoints_total_limit)."""
        folder = os.path.join(self.exp_dir, "weights")
        if not os.path.isdir(folder):
            return
        kept = {step for step, _ in list_checkpoints(self.exp_dir)}
        for name in os.listdir(folder):
            stem = name.split(".")[0]
            full = os.path.join(folder, name)
            if name.endswith(".safetensors") and stem.isdigit() and int(stem) not in kept and os.path.isfile(full):
                os.remove(full)


def exported_weights_path(exp_dir: str, step: int) -> str:
    return os.path.join(exp_dir, "weights", f"{step:07d}.safetensors")


def open_run_log(cfg, exp_dir: str, is_main: bool, gather):
    """The run's logger: `<exp_dir>/log.txt` and the console on rank 0. A log file that cannot be
    opened ends the run on every rank with one line (see :func:`run_folder_error`)."""
    error = None
    if not is_main:
        log = setup_file_logger(None, False)
    else:
        try:
            log = setup_file_logger(exp_dir, True)
        except OSError as e:
            log, error = setup_file_logger(None, True), run_folder_error(cfg, exp_dir, e)
    error = next((e for e in gather(error) if e is not None), None)
    if error is not None:
        raise error
    return log


def flat(config: dict, prefix: str = "", whole=None) -> dict:
    """{"preview.method": "euler", ...}: nested dicts flattened to dotted keys (lists stay values); the
    keys in `whole` (default: the training config's mapping-valued keys, declared with each key) stay
    whole."""
    if whole is None:
        from training.config import TrainConfig

        whole = set(mapping_valued_keys(TrainConfig))
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in whole:
            out.update(flat(value, f"{prefix}{key}.", whole))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict, defaults: Optional[dict] = None) -> list:
    """["key: old -> new", ...] between two run configs (plain dicts), for the keys that matter;
    `weighting` in configs written before `time_distribution` counts as the same key, a key that an
    older config lacks (added since) counts as its default (`defaults`, a config dict), and registry
    specs are compared in their canonical form (`null`, `laplacian` and `{name: laplacian}` are one)."""
    from training.config import TrainConfig

    old = dict(old)
    if "weighting" in old and "time_distribution" not in old:
        old["time_distribution"] = old.pop("weighting")
    a, b = flat(old), flat(new)
    for key, value in flat(defaults or {}).items():
        a.setdefault(key, value)
    same_a, same_b = canonical_values(TrainConfig, a), canonical_values(TrainConfig, b)
    keys = [k for k in sorted(set(a) | set(b)) if k.split(".")[0] not in NOT_COMPARED]
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys if same_a.get(k) != same_b.get(k)]


def _short(value) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def record_config(cfg, exp_dir: str, start_step: int, previous: dict | None, log, is_main: bool, gather) -> None:
    """Write the config this start trains with: `config.yaml` and `configs/<start_step>.yaml` (an
    earlier version of that name is kept with a suffix, so no version is lost). `previous`: the run
    config stored in the checkpoint being resumed (None for a fresh run); its differences are
    logged as one warning line."""
    config = config_to_dict(cfg)
    if previous is not None:
        from training.config import TrainConfig

        changes = config_changes(previous, config, config_to_dict(OmegaConf.structured(TrainConfig)))
        if changes:
            log.warning(f"WARNING: resuming at step {start_step} with settings that differ from the checkpoint's run: "
                        + "; ".join(changes) + f" (the earlier config is kept in {os.path.join(exp_dir, CONFIGS)})")
    error = _write_config_versions(cfg, config, exp_dir, start_step, previous, log) if is_main else None
    error = next((e for e in gather(error) if e is not None), None)
    if error is not None:
        raise error


def _write_config_versions(cfg, config: dict, exp_dir: str, start_step: int, previous, log):
    folder = os.path.join(exp_dir, CONFIGS)
    path = target = os.path.join(folder, f"{start_step:07d}.yaml")
    try:
        os.makedirs(folder, exist_ok=True)
        legacy = os.path.join(exp_dir, "config.yaml")
        if previous is not None and not os.listdir(folder) and is_regular_file(legacy):
            os.replace(legacy, os.path.join(folder, "before.yaml"))  # a folder from before configs/ existed
        if os.path.lexists(path):
            check_regular([path])
            try:
                same = read_record(path, "config", fmt="yaml", max_bytes=MAX_CONFIG_BYTES) == config
            except RecordError as e:  # damaged or edited: kept aside like any other earlier version
                log.warning(f"WARNING: {e}; kept as it is, under the next free name")
                same = False
            if not same:
                n = 1
                while os.path.lexists(f"{path[:-5]}.{n}.yaml"):
                    n += 1
                os.replace(path, f"{path[:-5]}.{n}.yaml")
        for target in (os.path.join(exp_dir, "config.yaml"), path):
            save_config(cfg, target)
    except OSError as e:
        return run_folder_error(cfg, exp_dir, e, f"cannot write {target}")
    return None


def run_folder_error(cfg, exp_dir: str, error: OSError, what: str = ""):
    """One ConfigError / CheckpointWriteError line for an OSError while setting up the run folder."""
    if isinstance(error, NotRegularFile):  # a planted link, FIFO or folder: its message names it
        return ConfigError(str(error))
    what = what or f"cannot create the run folder {exp_dir}"
    reason = describe_write_error(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"{what}: {reason}; free some space and start again (no step was trained, "
                                    "no checkpoint touched)")
    if error.errno == errno.ENAMETOOLONG and len(os.fsencode(cfg.exp_name)) > 255:
        return ConfigError(f"exp_name: {cfg.exp_name[:32]!r}... ({len(os.fsencode(cfg.exp_name))} bytes) is too long "
                           f"for a folder name in {cfg.output_dir} ({reason}; most file systems allow 255 bytes); "
                           "choose a shorter exp_name")
    blocker = exp_dir
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if blocker and not os.path.isdir(blocker):
        return ConfigError(f"output_dir: {what}: {reason} ({blocker} is a file, not a folder); "
                           "choose another output_dir or exp_name")
    return ConfigError(f"output_dir: {what}: {reason}; choose an output_dir you can write to")
