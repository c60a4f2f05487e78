"""Run configuration: dataclass defaults <- YAML file(s) <- command-line overrides.

    cfg = load_config(TrainConfig, sys.argv[1:])

`argv` accepts, in any order:
  --config FILE.yaml | --config=FILE.yaml   (repeatable; later files win)
  key=value | --key value | --key=value     (dashes in keys become underscores,
                                             nested keys use dots: preview.cfg_scale=4)
  --flag                                    (a bare flag means `true`; a token holding
                                             '=' is never taken as a --key's value)
Values are parsed as YAML (`lr=1e-4`, `stage_weights=[0.9,0.1]`, `resume=null`), except for
keys typed `str`, which keep the text as typed (`mixed_precision=no` is "no", not False;
`null` is still None).

Unknown keys (in a YAML file or on the command line) raise ValueError naming the key and
listing close matches; values of the wrong type raise ValueError naming the key. Keys that
are typed `Dict[str, Any]` in the dataclass (e.g. free-form model overrides) accept any
sub-key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.atomic import atomic_write

__all__ = ["load_config", "save_config", "config_to_dict", "parse_argv", "config_help"]


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_free_dict(tp) -> bool:
    tp = _strip_optional(tp)
    return tp is dict or typing.get_origin(tp) is dict or tp is Any


def _check_keys(cls, data: Any, where: str, prefix: str = "") -> None:
    """Raise ValueError for every key of `data` (a nested dict) that `cls` does not define."""
    if not isinstance(data, dict):
        return
    types = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types:
            candidates = list(types)
            close = difflib.get_close_matches(str(key), candidates, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown config key '{full}' in {where}.{hint} "
                f"Valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(candidates)}."
            )
        tp = _strip_optional(types[key])
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"Config key '{full}' in {where} must be a mapping, got {value!r}.")
            _check_keys(tp, value, where, prefix=f"{full}.")
        elif isinstance(value, dict) and not _is_free_dict(types[key]):
            raise ValueError(f"Config key '{full}' in {where} takes a single value, got a mapping {value!r}.")


def _is_str_field(cls, path: list) -> bool:
    for i, name in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            return False
        types = _field_types(cls)
        if name not in types:
            return False
        tp = _strip_optional(types[name])
        if i == len(path) - 1:
            return tp is str
        cls = tp
    return False


def parse_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into (config files, dotlist overrides `key=value`)."""
    files: list[str] = []
    dotlist: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i < len(args) and not args[i].startswith("--") and "=" not in args[i]:
                key, value = body, args[i]
                i += 1
            else:
                key, value = body, "true"
            key = key.replace("-", "_")
            if key == "config":
                files.append(value)
            else:
                dotlist.append(f"{key}={value}")
        elif "=" in arg:
            key, value = arg.split("=", 1)
            key = key.replace("-", "_")
            if key == "config":
                files.append(value)
            else:
                dotlist.append(f"{key}={value}")
        else:
            raise ValueError(
                f"Cannot parse command-line argument {arg!r}: use key=value, --key value or --config FILE.yaml."
            )
    return files, dotlist


def _to_value_error(err: OmegaConfBaseException, where: str) -> ValueError:
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if key:
        return ValueError(f"Invalid value for config key '{key}' in {where}: {msg}")
    return ValueError(f"Invalid config in {where}: {msg}")


def load_config(defaults_type, argv: Sequence[str] | None = None) -> DictConfig:
    """defaults (dataclass type) <- --config YAML files <- overrides; returns a DictConfig.

    Raises ValueError (clear message, naming the key) for unknown keys, unparsable arguments,
    values of the wrong type, and FileNotFoundError for a missing --config file.
    """
    import sys

    if argv is None:
        argv = sys.argv[1:]
    files, dotlist = parse_argv(argv)
    cfg = OmegaConf.structured(defaults_type)
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors
            raise ValueError(f"Cannot parse config file {path}: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"Config file {path} must hold a mapping of key: value pairs.")
        plain = OmegaConf.to_container(loaded)
        _check_keys(defaults_type, plain, f"config file {path}")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _to_value_error(e, f"config file {path}") from None
    if dotlist:
        try:
            overrides = OmegaConf.from_dotlist(dotlist)
            # A key typed `str` keeps the text as typed: `mixed_precision=no` is "no", not False.
            for item in dotlist:
                key, value = item.split("=", 1)
                raw = value.strip()
                if raw in ("null", "~", "Null", "NULL") or raw[:1] in ("'", '"'):
                    continue  # null stays None; quotes were already handled by the parser
                if _is_str_field(defaults_type, key.split(".")):
                    OmegaConf.update(overrides, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise _to_value_error(e, "command-line overrides") from None
        _check_keys(defaults_type, OmegaConf.to_container(overrides), "command-line overrides")
        try:
            cfg = OmegaConf.merge(cfg, overrides)
        except OmegaConfBaseException as e:
            raise _to_value_error(e, "command-line overrides") from None
    return cfg


def config_to_dict(cfg) -> dict:
    """DictConfig / dataclass instance / dict -> plain nested dict (YAML/JSON/pickle-safe)."""
    if isinstance(cfg, dict):
        return cfg
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically (temporary file in the same folder, then rename)."""
    text = OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))
    with atomic_write(path, "w", fsync=True) as f:
        f.write(text)


def config_help(defaults_type, docs: dict[str, str] | None = None) -> str:
    """One line per key: `key (default): meaning` — for `--help`."""
    docs = docs or {}
    lines: list[str] = []

    def walk(cls, prefix: str) -> Iterable[str]:
        for f in dataclasses.fields(cls):
            tp = _strip_optional(_field_types(cls)[f.name])
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "???"
            meaning = f.metadata.get("help") or docs.get(prefix + f.name, "")
            yield f"  {prefix}{f.name} = {default!r}" + (f"   # {meaning}" if meaning else "")

    lines.extend(walk(defaults_type, ""))
    return "\n".join(lines)
