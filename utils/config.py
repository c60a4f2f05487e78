"""Run configuration: dataclass defaults <- YAML file(s) <- command-line overrides.

    cfg = load_config(TrainConfig, sys.argv[1:], aliases=TRAIN_ALIASES)

`argv` accepts, in any order:
  --config FILE.yaml | --config=FILE.yaml   (repeatable; later files win; a file may name others
                                             under `include:`, which it overrides)
  key=value | --key value | --key=value     (dashes in keys become underscores,
                                             nested keys use dots: preview.cfg_scale=4)
  --flag                                    (a bare flag means `true`; a token holding
                                             '=' is never taken as a --key's value)

The defaults are an omegaconf structured config (`OmegaConf.structured(dataclass)`); every
file and every override is applied to it in order with `OmegaConf.update`, so omegaconf
itself rejects unknown keys and values of the wrong type, and **the last value given wins**
for every key, whatever its type (`data_dir=/a data_dir=null` gives None,
`exp_name=a exp_name='b'` gives "b"). Values are parsed as YAML (`lr=1e-4`,
`stage_weights=[0.9,0.1]`, `resume=null`), except for keys typed `str`, which keep the text as
typed (`mixed_precision=no` is "no", not False; `null` is still None; quotes are removed).
A value that is not YAML, holds a tag (`!!python/...`) or does not fit its key's type is one
ValueError naming the key.

Text is text: omegaconf would read `${...}` in a value as an interpolation (`${oc.env:HOME}`
reads an environment variable). This project never interpolates, whether the value comes from
the command line, a config file or a file read back (a checkpoint's config, `config.yaml`): every
string enters a DictConfig escaped (:func:`to_config` and the loader here), and
:func:`config_to_dict` returns the text as written without resolving anything.

Aliases: option names users bring from the reference code (`learning_rate`, `stages_count`,
...) are translated into ours by an `Alias` table; reference options that have no meaning
here are listed as `ignored` and produce one warning line each instead of an error. Any other
unknown key is a ValueError naming it, with close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.atomic import atomic_write

__all__ = ["Alias", "load_config", "save_config", "config_to_dict", "to_config", "literal", "parse_argv", "config_help",
           "warn", "option_help", "field_options", "declared_keys", "mapping_valued_keys", "canonical_values"]

NULLS = ("null", "~", "Null", "NULL")


@dataclass(frozen=True)
class Alias:
    """A reference-code option name and how it maps onto ours.

    `target`: our (dotted) key that receives the value unchanged; or `convert(value, cfg)`,
    which returns a dict {our_key: value} (it may read the config built so far, e.g. to
    combine `mode` and `heun` into one `method`). Neither: the option has no meaning here and
    is ignored with a warning that says `note`.
    """

    target: Optional[str] = None
    convert: Optional[Callable[[Any, DictConfig], Dict[str, Any]]] = None
    note: str = ""

    def apply(self, value: Any, cfg: DictConfig) -> Dict[str, Any]:
        if self.convert is not None:
            return self.convert(value, cfg)
        if self.target is not None:
            return {self.target: value}
        return {}


def option_help(text: str, spec: bool = False, registry=None, identity: bool = False) -> dict:
    """The metadata of a config dataclass field, the one declaration of a key: its one-line meaning
    for `--help`; `registry`: the registry (utils/registry.py) whose specs the key takes (a name or
    a mapping with a name): validated and listed in `--help` through it, compared in its canonical
    form, and replaced whole by a later value instead of merged into (`method: {name: sde,
    last_noisy_time: 0.1}` then `method: euler`; `spec` says the same for a key whose registry is
    not at hand); `identity`: the key changes what a run trains, so a default experiment name
    carries it (training/config.py)."""
    return {"help": text, "spec": spec or registry is not None, "registry": registry, "identity": identity}


def warn(message: str) -> None:
    """One warning line on stderr, from rank 0 only (torchrun/accelerate set RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- text stays text

# `${` and the backslashes right before it: omegaconf reads 2k+1 backslashes there as k backslashes
# and a literal `${`, and 2k backslashes as k backslashes and an interpolation
_OPENING = re.compile(r"(\\*)\$\{")


def literal(value: Any) -> Any:
    """`value` with every string (in lists and dicts too) escaped so that omegaconf keeps it as text:
    `${oc.env:X}` becomes `\\${oc.env:X}`, which a DictConfig gives back as `${oc.env:X}`. Every
    value that enters a DictConfig goes through here (:func:`to_config`, the loader)."""
    if isinstance(value, str):
        return _OPENING.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    if isinstance(value, Mapping) and not isinstance(value, DictConfig):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    return value


def _text(value: Any) -> Any:
    """The inverse of :func:`literal` on plain data from a DictConfig: escaped openings become the text
    written; an opening that was not escaped stays as it is (it is text too, never resolved)."""
    if isinstance(value, str):
        return _OPENING.sub(lambda m: "\\" * (len(m.group(1)) // 2) + "${" if len(m.group(1)) % 2 else m.group(0),
                            value)
    if isinstance(value, dict):
        return {k: _text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def _no_environment(*args):
    raise ValueError("a config value asked for an environment variable (${oc.env:...}); this project keeps such "
                     "text as written and never reads the environment through a config")


# The resolver that reads outside the config, replaced: should a string ever reach a DictConfig
# without `literal`, omegaconf still cannot read an environment variable (a secret) through it.
OmegaConf.register_resolver("oc.env", _no_environment, replace=True)


def to_config(data) -> DictConfig:
    """A DictConfig of plain data (a dict from :func:`config_to_dict`, a file, a checkpoint), with
    every string kept as text (see :func:`literal`): the one way plain data becomes a DictConfig."""
    return OmegaConf.create(literal(config_to_dict(data)))


# ----------------------------------------------------------------------------- field types

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_metadata(cls, path: Sequence[str]) -> Mapping:
    """The metadata of the dotted key `path` in dataclass `cls` ({} if it is not a field)."""
    tp = cls
    for i, name in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            return {}
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if name not in fields:
            return {}
        if i == len(path) - 1:
            return fields[name].metadata
        tp = _strip_optional(_field_types(tp)[name])
    return {}


def _field_type(cls, path: Sequence[str]):
    """Type of the dotted key `path` in dataclass `cls`, or None if it is not a field."""
    tp = cls
    for name in path:
        if not dataclasses.is_dataclass(tp):
            return None
        types = _field_types(tp)
        if name not in types:
            return None
        tp = _strip_optional(types[name])
    return tp


def _suggest(cls, key: str) -> str:
    """'Did you mean ...' and the valid keys at the level where `key` goes wrong."""
    parts = key.split(".")
    tp, prefix = cls, ""
    for name in parts:
        if not dataclasses.is_dataclass(tp):
            return ""
        types = _field_types(tp)
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
            return f"{hint} Valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(types)}."
        tp, prefix = _strip_optional(types[name]), f"{prefix}{name}."
    return ""


# ----------------------------------------------------------------------------- argv

def parse_argv(argv: Sequence[str], file_options: Iterable[str] = ("config",)
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split argv into ([(file option, path)], [(key, raw value)]), both in order.

    `file_options`: option names that take a YAML file (`--config`, and e.g. `--train-config`).
    """
    file_options = set(file_options)
    files: list[tuple[str, str]] = []
    overrides: list[tuple[str, str]] = []
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
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ValueError(
                f"Cannot parse command-line argument {arg!r}: use key=value, --key value or --config FILE.yaml.")
        key = key.replace("-", "_")
        if key in file_options:
            files.append((key, value))
        else:
            overrides.append((key, value))
    return files, overrides


def _parse_value(defaults_type, key: str, raw: str) -> Any:
    """A command-line value: YAML, except that `str` keys keep their text (see module doc), and that a
    list key also takes comma-separated values without brackets (`num_steps_per_scale=40,10`,
    `budgets=0.5`); plain data (no tags), never interpolated; ValueError naming the key otherwise."""
    text = raw.strip()
    if text in NULLS:
        return None
    tp = _field_type(defaults_type, key.split("."))
    if tp is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return raw
    if (tp is list or typing.get_origin(tp) in (list, typing.List)) and text and text[0] not in "[{":
        raw = f"[{text}]"
    from utils.records import RecordError, parse_yaml

    try:
        # the value as the block under a key, so a scalar parses too (omegaconf's loader wants a mapping)
        value = parse_yaml("v:\n  " + raw.replace("\n", "\n  "), "", max_bytes=MAX_CONFIG_BYTES)["v"]
    except RecordError as error:
        raise ValueError(f"Invalid value for config key '{key}' on the command line: {_short_repr(raw)}"
                         f"{str(error)}") from None
    return value


# ----------------------------------------------------------------------------- merging

def _is_free_dict(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict or tp is Any


def _set(cfg: DictConfig, defaults_type, key: str, value: Any, where: str) -> None:
    """cfg[key] = value (dicts merge into dicts), validated by omegaconf; ValueError on failure."""
    tp = _field_type(defaults_type, key.split("."))
    if isinstance(value, Mapping) and tp is not None:  # (an unknown key: omegaconf raises below)
        if dataclasses.is_dataclass(tp):
            for sub, sub_value in value.items():
                _set(cfg, defaults_type, f"{key}.{sub}", sub_value, where)
            return
        if not _is_free_dict(tp):
            raise ValueError(f"Config key '{key}' in {where} takes a single value, got a mapping {dict(value)!r}.")
    elif dataclasses.is_dataclass(tp) and value is not None:
        raise ValueError(f"Config key '{key}' in {where} must be a mapping, got {value!r}.")
    if _field_metadata(defaults_type, key.split(".")).get("spec"):  # replaced whole, never merged
        OmegaConf.update(cfg, key, None, merge=False, force_add=False)
    try:
        OmegaConf.update(cfg, key, literal(value), merge=True, force_add=False)
    except (OmegaConfBaseException, OverflowError) as e:  # OverflowError: a 400-digit integer for a float
        if tp is None and not _inside_free_dict(defaults_type, key):
            raise ValueError(f"Unknown config key '{key}' in {where}.{_suggest(defaults_type, key)}") from None
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ValueError(f"Invalid value for config key '{key}' in {where}: {msg}") from None


def _inside_free_dict(defaults_type, key: str) -> bool:
    parts = key.split(".")
    for n in range(1, len(parts)):
        if _is_free_dict(_field_type(defaults_type, parts[:n])):
            return True
    return False


def _apply(cfg: DictConfig, defaults_type, items: Iterable[Tuple[str, Any]], where: str,
           aliases: Mapping[str, Alias]) -> None:
    for key, value in items:
        key = str(key).replace("-", "_")
        alias = aliases.get(key)
        if alias is not None and _field_type(defaults_type, key.split(".")) is None:
            mapped = alias.apply(value, cfg)
            if not mapped:
                warn(f"'{key}' ({where}) is an option of the reference code that has no effect here"
                     + (f": {alias.note}" if alias.note else "") + "; ignored")
            for target, target_value in mapped.items():
                _set(cfg, defaults_type, target, target_value, f"{where} (as '{key}')")
            continue
        _set(cfg, defaults_type, key, value, where)


MAX_CONFIG_BYTES = 1 << 20  # ours are under 4 KiB; YAML parsing costs ~3 s and ~200 MB per MB


def closest_files(path: str, n: int = 3, suffixes=(".yaml", ".yml")) -> list[str]:
    """The `n` files most like `path` (by name, `difflib`) among the YAML files of the deepest
    existing folder on its way and its sub-folders (2 levels, 300 folders at most: never a long walk)."""
    folder = os.path.dirname(os.path.normpath(path)) or "."
    while not os.path.isdir(folder) and folder not in ("", os.sep, "."):
        folder = os.path.dirname(folder) or "."
    found, depth0 = [], folder.rstrip(os.sep).count(os.sep)
    for visited, (root, dirs, names) in enumerate(os.walk(folder)):
        deep = root.rstrip(os.sep).count(os.sep) - depth0 >= 2
        dirs[:] = [] if deep or visited >= 300 else sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.normpath(os.path.join(root, f)) for f in sorted(names) if f.endswith(suffixes)]
    by_name = {}
    for candidate in found:
        by_name.setdefault(os.path.basename(candidate), candidate)
    close = difflib.get_close_matches(os.path.basename(path), list(by_name), n=n, cutoff=0.4)
    return [by_name[name] for name in close]


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping as a plain dict (clear errors for missing / bad files). The
    file may be a link (configs are shared that way), but it must lead to a regular file of at most
    MAX_CONFIG_BYTES (a FIFO or device is refused, never read)."""
    from utils.records import RecordError, read_record

    if not os.path.exists(path):
        close = closest_files(path)
        hint = f"; closest existing: {', '.join(close)}" if close else ""
        raise FileNotFoundError(f"config file {path} does not exist{hint}")
    if os.path.isdir(path):
        raise FileNotFoundError(f"config file {path} is a folder, not a YAML file")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path} is {size / 2**20:.1f} MiB; a config file is at most "
                         f"{MAX_CONFIG_BYTES // 2**20} MiB (a few hundred lines of key: value): is it the right file?")
    try:
        data = read_record(path, "config file", fmt="yaml", max_bytes=MAX_CONFIG_BYTES, follow_links=True)
    except RecordError as e:
        raise ValueError(f"Cannot read {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} does not look like a config file: {_short_repr(data)} is not a mapping "
                         "of key: value pairs")
    odd = [k for k in data if not isinstance(k, str) or not k or any(c.isspace() for c in k)]
    if odd:
        raise ValueError(f"config file {path} does not look like a config file: {_short_repr(odd[0])} is not a key "
                         "(keys are names like lr or preview.method)")
    return data


MAX_INCLUDE_DEPTH = 8


def config_file_layers(path: str) -> list[tuple[str, dict]]:
    """[(path, mapping)] of a config file and the files it names under `include:` (a path or a list
    of paths, relative to the file), in the order they are applied, later winning.

    The order: every file once, each after the files it includes (in their listed order) and
    before the file that includes it; a file included a second time (a diamond: a includes b and
    c, both include d) is not applied again, so `d, b, c, a`: c's values beat b's, and a's beat
    all. Each file is read once, so the cost grows with the number of files, not of include paths.
    """
    order: list = []
    applied: set = set()

    def visit(file: str, chain: tuple) -> None:
        real = os.path.realpath(file)
        if real in chain or len(chain) > MAX_INCLUDE_DEPTH:
            raise ValueError(f"config file {file}: `include` goes round in a circle or deeper than "
                             f"{MAX_INCLUDE_DEPTH} levels")
        if real in applied:
            return
        data = read_yaml_mapping(file)
        for name in _included_files(data.pop("include", None), file):
            visit(os.path.join(os.path.dirname(file), name), chain + (real,))
        applied.add(real)
        order.append((file, data))

    visit(path, ())
    return order


def _included_files(value, path: str) -> list[str]:
    """The `include:` of config file `path` as a list of file names (ValueError for anything else)."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"config file {path}: `include` takes a file name or a list of file names, got "
                         f"{_short_repr(value)}")
    return names


def _short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_config(defaults_type, argv: Sequence[str] | None = None, *,
                aliases: Optional[Mapping[str, Alias]] = None,
                file_layers: Optional[Mapping[str, Callable[[dict], dict]]] = None,
                config_options: Sequence[str] = ("config",)) -> DictConfig:
    """defaults (dataclass type) <- YAML files <- overrides, in the order given; returns a DictConfig.

    `aliases`: reference option names (see `Alias`). `config_options`: the options that name a
    config file (`--config`; generate.py also takes the reference's `--eval-config`).
    `file_layers`: extra file options, each with a function that selects/renames the keys taken from such a file
    (generate.py's `--train-config`); those files are applied first, below every `--config`. A file may
    start from others with `include: other.yaml` (see `config_file_layers`).
    Raises ValueError (clear message, naming the key) for unknown keys, unparsable arguments,
    values of the wrong type, and FileNotFoundError for a missing config file.
    """
    if argv is None:
        argv = sys.argv[1:]
    aliases = aliases if aliases is not None else {}
    file_layers = dict(file_layers or {})
    files, overrides = parse_argv(argv, (*config_options, *file_layers))
    cfg = OmegaConf.structured(defaults_type)
    ordered = [f for f in files if f[0] in file_layers] + [f for f in files if f[0] not in file_layers]
    for option, top in ordered:
        layers = config_file_layers(top)
        if option in file_layers:  # one selection from the file and what it includes
            layers = [(top, file_layers[option]({k: v for _, data in layers for k, v in data.items()}))]
        for path, data in layers:
            _apply(cfg, defaults_type, data.items(), f"config file {path}", aliases)
    parsed = []
    for key, raw in overrides:
        target = aliases[key].target if key in aliases and aliases[key].target else key
        parsed.append((key, _parse_value(defaults_type, target, raw)))
    _apply(cfg, defaults_type, parsed, "command-line overrides", aliases)
    return cfg


def config_to_dict(cfg) -> dict:
    """DictConfig / dataclass instance / dict -> plain nested dict (YAML/JSON/pickle-safe), every string
    the text as written: nothing is resolved (see :func:`literal`)."""
    if isinstance(cfg, dict):
        return cfg
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return _text(OmegaConf.to_container(cfg, resolve=False))


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically (temporary file in the same folder, then rename); text as written
    (every string escaped, so resolving only unescapes: `${...}` is written as it was given)."""
    text = OmegaConf.to_yaml(to_config(cfg), resolve=True)
    with atomic_write(path, "w", fsync=True) as f:
        f.write(text)


def yaml_spelling(value: Any) -> str:
    """`value` as one would write it in a config file or after `key=`: null, true, [0.9, 0.1]."""
    if value == "???":
        return value
    text = OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()
    if isinstance(value, (list, tuple, dict)) and value:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text[len("v: "):] if text.startswith("v: ") else text


def field_options(defaults_type, prefix: str = "") -> Dict[str, Tuple[Any, Mapping]]:
    """{dotted key: (type, metadata)} of every leaf key of a config dataclass (nested ones walked)."""
    out: Dict[str, Tuple[Any, Mapping]] = {}
    for f in dataclasses.fields(defaults_type):
        tp = _strip_optional(_field_types(defaults_type)[f.name])
        if dataclasses.is_dataclass(tp):
            out.update(field_options(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (tp, f.metadata)
    return out


def declared_keys(defaults_type, flag: str) -> Tuple[str, ...]:
    """The dotted keys whose declaration (`option_help`) sets `flag` (e.g. "identity")."""
    return tuple(k for k, (_, meta) in field_options(defaults_type).items() if meta.get(flag))


def mapping_valued_keys(defaults_type) -> Tuple[str, ...]:
    """The dotted keys whose value may be a mapping (free dicts and registry specs): kept whole when a
    config is flattened to dotted keys."""
    return tuple(k for k, (tp, meta) in field_options(defaults_type).items() if meta.get("spec") or _is_free_dict(tp))


def canonical_values(defaults_type, flat_config: Mapping[str, Any]) -> Dict[str, Any]:
    """A flattened config with every registry-spec value in its registry's canonical form (so that
    `null`, `laplacian` and `{name: laplacian}` compare equal); values a registry refuses stay as they are."""
    out = dict(flat_config)
    for key, (_, meta) in field_options(defaults_type).items():
        registry = meta.get("registry")
        if registry is not None and key in out:
            try:
                out[key] = registry.canonical(out[key])
            except ValueError:
                pass
    return out


def config_help(defaults_type, aliases: Optional[Mapping[str, Alias]] = None, registries=None) -> str:
    """One line per key: `key = default   # meaning` (defaults in YAML spelling) — for `--help`; then the
    entries of every registry a key takes (declared with the key, `option_help(registry=...)`, plus
    `registries`: {key: Registry} or a function returning it, for keys nested in free mappings), each
    with its parameters; then the aliases."""
    lines: List[str] = []

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
            meaning = f.metadata.get("help", "")
            yield f"  {prefix}{f.name} = {yaml_spelling(default)}" + (f"   # {meaning}" if meaning else "")

    lines.extend(walk(defaults_type, ""))
    by_registry: Dict[int, Tuple[List[str], Any]] = {}
    declared = {k: meta["registry"] for k, (_, meta) in field_options(defaults_type).items() if meta.get("registry")}
    for key, registry in {**declared, **(registries() if callable(registries) else registries or {})}.items():
        by_registry.setdefault(id(registry), ([], registry))[0].append(key)
    for keys, registry in by_registry.values():
        key = " / ".join(keys)
        lines.append(f"{key}: a name, or {{name: ..., parameter: value}}; registered {registry.kind}s:")
        lines.extend(registry.describe())
    if aliases:
        lines.append("reference-code option names accepted as aliases:")
        for name, alias in sorted(aliases.items()):
            what = alias.target or (alias.note if alias.convert is not None else f"ignored ({alias.note})")
            lines.append(f"  {name} -> {what}")
    return "\n".join(lines)
