"""The provenance record of a sample run: what made `{sample_dir}/{run_name}.npz`.

generate.py (rank 0) writes `{sample_dir}/{run_name}.provenance.json` beside the `.npz`:
first with ``"complete": false`` before any image is sampled, then again with
``"complete": true``, the `.npz`'s sha256 and its image count once the `.npz` is written. A run
killed in between leaves a record saying it is incomplete; ``python -m evaluation.evaluate``
copies the record into its result and refuses samples whose record is incomplete or names
another file (docs/GENERATION.md, "Provenance record"; docs/EVALUATION.md).

Fields (JSON object):

- ``format`` ("dfm-sample-provenance"), ``version`` (1), ``complete`` (bool),
  ``started`` / ``finished`` (UTC, ISO 8601; ``finished`` null while incomplete);
- ``npz`` (file name beside the record, null with ``save_npz: false``), ``npz_sha256``,
  ``num_images`` (null while incomplete);
- ``checkpoint``: ``path`` (as given), ``bytes``, ``sha256``, ``sha256_from`` ("sidecar": its
  ``.sha256`` file, which loading the checkpoint verified, or "file": hashed here), ``step``
  (the checkpoint's ``steps``, null for published ones), ``arch`` (the loaded model's),
  ``use_ema``, ``weights`` (the group actually loaded: "ema", "model", "state_dict", or null
  for a plain state dict), ``weights_info`` (the checkpoint's, e.g. a post-hoc EMA's
  ``{"kind": "posthoc_ema", "std": 0.08}``; null when absent);
- ``sampler``: ``method`` (spec), ``method_text``, ``num_steps_per_scale``, ``thresholds``,
  ``nfe`` (model evaluations per sample), ``nfe_with_cfg`` (x2 when ``cfg_scale != 1``: the
  unconditional pass; an upper bound when the guidance interval is narrower than [0, 1]),
  ``cfg_scale``, ``guidance_low``, ``guidance_high``, ``inference_budget``,
  ``unconditional_inference_budget``, ``autoguidance``, ``path_type``, ``prediction``, ``precision``, ``vae``,
  ``resolution``;
- ``seed``, ``labels``, ``num_classes``, ``num_samples``, ``num_processes``;
- ``code_version`` (git commit of this repository, ``-dirty`` appended when ``git status
  --porcelain`` lists anything; null without git or a repository), ``torch_version``,
  ``python_version``;
- ``config``: the fully resolved config (as ``{run_name}/config.yaml``).
"""
from __future__ import annotations

import datetime
import json
import numbers
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional, Tuple

from utils.atomic import atomic_write
from utils.checksum import file_sha256, read_sidecar

RECORD_FORMAT = "dfm-sample-provenance"
RECORD_VERSION = 1
SUFFIX = ".provenance.json"
REPO = Path(__file__).resolve().parents[1]
_GIT_TIMEOUT_S = 60


def record_path(npz_path) -> Path:
    """``X.npz`` -> ``X.provenance.json`` in the same folder (another name gets the suffix appended)."""
    path = Path(npz_path)
    stem = path.name[:-len(".npz")] if path.name.endswith(".npz") else path.name
    return path.with_name(stem + SUFFIX)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def code_version(repo=REPO) -> Optional[str]:
    """The commit of the git repository at ``repo`` (``<sha>-dirty`` when ``git status --porcelain``
    lists anything); None when git is missing, ``repo`` is not the top of a repository, or git fails."""
    def git(*args) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                              text=True, timeout=_GIT_TIMEOUT_S, check=True).stdout
    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").split()
        if os.path.realpath(top) != os.path.realpath(repo):
            return None  # a repository above ours, not this code's
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return commit + ("-dirty" if dirty else "")


def read_record(npz_path) -> Tuple[Path, Optional[dict]]:
    """``(record path, record)`` of a sample ``.npz``; the record is None when there is no file (ADM's
    and other foreign ``.npz`` files). ValueError (one line) for a file that is not a record."""
    path = record_path(npz_path)
    return path, load_record(path)


MAX_RECORD_BYTES = 1 << 20  # ours are a few KiB


def load_record(path) -> Optional[dict]:
    """The record at ``path`` (None when there is no such name); ValueError (one line) for one that is
    not a record: a link, FIFO or folder under the name, larger than MAX_RECORD_BYTES, nested deeper
    than records are, not JSON or not written by generate.py (utils/records.py)."""
    from utils.records import RecordError, read_record

    path = Path(path)
    try:
        record = read_record(path, "provenance record", max_bytes=MAX_RECORD_BYTES, missing_ok=True)
    except RecordError as error:
        raise ValueError(f"{error}; rerun generate.py to rewrite it, or delete it") from None
    if record is None:
        return None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("complete"), bool)):
        raise ValueError(f"provenance record {path}: not a record of generate.py (format {RECORD_FORMAT} "
                         "with 'complete'); rerun generate.py to rewrite it, or delete it")
    return record


def _step(value) -> Optional[int]:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def describe_checkpoint(path: str, use_ema: bool, trust_checkpoint: bool) -> dict:
    """The ``checkpoint`` fields of a record. The file is read again (memory-mapped for ``.pt``) for its
    step and ``weights_info``; its sha256 is the ``.sha256`` sidecar when there is one (loading the model
    checked the file against it), else a full read of the file."""
    from models.checkpoints import read_checkpoint, weights_group

    from .config import GenerationError

    try:
        checkpoint = read_checkpoint(path, trust_checkpoint=trust_checkpoint, verify=False)
        sidecar = read_sidecar(path)
        digest = sidecar or file_sha256(path)
        size = os.path.getsize(path)
    except (OSError, ValueError) as error:
        raise GenerationError(f"checkpoint {path}: cannot read it again to record its step and sha256 ({error}); "
                              "was it moved or replaced during the run?") from None
    info = checkpoint.get("weights_info")
    if isinstance(info, dict):
        from utils.records import RecordError, check_record

        try:
            check_record(info, f"checkpoint {path}: its weights_info")  # copied into the record, and into results
        except RecordError as error:
            raise GenerationError(f"{error}; it describes the weights and is copied into the provenance record: "
                                  "rewrite the checkpoint without it") from None
    return {"path": str(path), "bytes": size, "sha256": digest, "sha256_from": "sidecar" if sidecar else "file",
            "step": _step(checkpoint.get("steps")), "use_ema": bool(use_ema),
            "weights": weights_group(checkpoint, use_ema),
            "weights_info": info if isinstance(info, dict) else None}


def sampler_settings(config: dict) -> dict:
    """The ``sampler`` fields of a record, from a resolved config (a plain dict)."""
    from samplers.methods import build_method, describe

    steps = [int(n) for n in config["num_steps_per_scale"]]
    nfe = build_method(config["method"]).nfe(sum(steps))
    keys = ("cfg_scale", "guidance_low", "guidance_high", "inference_budget", "unconditional_inference_budget",
            "autoguidance", "path_type", "precision", "vae", "resolution")
    return {"method": config["method"], "method_text": describe(config["method"]), "num_steps_per_scale": steps,
            "thresholds": list(config["thresholds"]), "nfe": nfe,
            "nfe_with_cfg": 2 * nfe if config["cfg_scale"] != 1.0 else nfe, **{k: config[k] for k in keys},
            "prediction": config.get("prediction", "velocity")}


class RunRecord:
    """The record of one generate.py run; rank 0 calls :meth:`write` (the checkpoint is hashed on the
    first call only)."""

    def __init__(self, cfg, model, num_processes: int):
        from utils.config import config_to_dict

        self.config = config_to_dict(cfg)  # the text as given: nothing in it is interpolated
        self.npz = Path(cfg.sample_dir) / f"{cfg.run_name}.npz" if cfg.save_npz else None
        self.path = record_path(Path(cfg.sample_dir) / f"{cfg.run_name}.npz")
        self.arch = dict(model.arch)
        self.num_processes = int(num_processes)
        self.started = utc_now()
        self._fixed: Optional[dict] = None  # computed once, on rank 0: the checkpoint's hash is a full read

    def on_disk(self) -> Optional[dict]:
        """The record at :attr:`path` now (None when there is none); ValueError (one line) for a name that
        does not hold a record of ours (see :func:`load_record`)."""
        return load_record(self.path)

    def is_complete(self) -> bool:
        """Whether the record on disk already says complete (a readable record of ours)."""
        try:
            record = self.on_disk()
        except ValueError:
            return False
        return record is not None and record["complete"]

    def content(self, complete: bool) -> dict:
        import torch

        c = self.config
        if self._fixed is None:
            self._fixed = {"checkpoint": describe_checkpoint(c["ckpt"], c["use_ema"], c["trust_checkpoint"]),
                           "code_version": code_version()}
        done = complete and self.npz is not None
        return {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "complete": bool(complete),
            "started": self.started, "finished": utc_now() if complete else None,
            "npz": self.npz.name if self.npz is not None else None,
            "npz_sha256": file_sha256(self.npz) if done else None,
            "num_images": c["num_samples"] if complete else None,
            "checkpoint": {**self._fixed["checkpoint"], "arch": self.arch},
            "sampler": sampler_settings(c),
            "seed": c["seed"], "labels": c["labels"], "num_classes": c["num_classes"],
            "num_samples": c["num_samples"], "num_processes": self.num_processes,
            "code_version": self._fixed["code_version"], "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "config": c,
        }

    def write(self, complete: bool) -> dict:
        """Write the record atomically (``complete``: the run's images and ``.npz`` are written); returns it."""
        record = self.content(complete)
        with atomic_write(self.path, "w", fsync=True) as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        return record
