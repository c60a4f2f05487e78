"""Reading JSON and YAML records from files the code did not just write: bounded, plain data.

A record read back (a provenance record, a run's `config.yaml` and `configs/<step>.yaml`, a sample
folder's `config.yaml`, `bad_samples.json`, a statistics file's meta, a weights header's fields)
may have been edited, damaged or planted. Every such read goes through here:

- the file is opened by :func:`utils.regular_files.open_regular` (no link followed, no FIFO);
- its size is bounded before it is parsed (`max_bytes`; ours are a few KiB);
- JSON with `json`, YAML with omegaconf's safe loader (no tags that run code, YAML aliases bounded
  by omegaconf); the result is plain data (dicts, lists, strings, numbers, booleans, None), never
  a DictConfig, so nothing in it is ever interpolated (`${oc.env:...}` stays text);
- nesting is bounded (`max_depth`), so code that walks the record recursively cannot overflow the
  stack (a JSON of 100,000 nested lists is 200 KB).

Every problem is one :class:`RecordError` (a ValueError) naming the file and what is wrong.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from utils.regular_files import read_regular

MAX_RECORD_BYTES = 1 << 20  # our records are under 20 KiB
MAX_DEPTH = 32  # ours nest 4 levels


class RecordError(ValueError):
    """A record that cannot be used: too large, too deeply nested, unparsable, or not a regular file."""


_PLAIN = (str, int, float, bool, type(None))


def check_nesting(value: Any, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """`value` itself when it is plain data (dicts, lists or tuples, strings, numbers, booleans, None) whose
    lists and dicts nest at most `max_depth` levels (checked iteratively: safe for any depth);
    RecordError otherwise."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = item
        elif isinstance(item, _PLAIN):
            continue
        else:
            raise RecordError(f"{what}: holds a {type(item).__name__} (a YAML tag?), not plain data")
        if depth > max_depth:
            raise RecordError(f"{what}: nested more than {max_depth} levels deep; not a record this code writes")
        stack.extend((child, depth + 1) for child in children)
    return value


def check_record(value: Any, what: str, max_bytes: int = MAX_RECORD_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """`value` itself when it is plain data nested at most `max_depth` levels whose JSON text is at most
    `max_bytes` (a record found inside another file: a checkpoint's config, arch or weights_info);
    RecordError otherwise."""
    check_nesting(value, what, max_depth)
    size = len(json.dumps(value, default=str))
    if size > max_bytes:
        raise RecordError(f"{what}: {size:,} bytes as JSON, more than the {max_bytes:,} such a record ever needs")
    return value


def parse_json(text, what: str, max_bytes: int = MAX_RECORD_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text (str or bytes) as plain data, bounded in size and nesting; RecordError naming `what`."""
    if len(text) > max_bytes:
        raise RecordError(f"{what}: {len(text):,} bytes of JSON, more than the {max_bytes:,} such a record ever needs")
    try:
        value = json.loads(text)
    except RecursionError:
        raise RecordError(f"{what}: nested more than {max_depth} levels deep; not a record this code writes") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise RecordError(f"{what}: not valid JSON ({error})") from None
    return check_nesting(value, what, max_depth)


def _yaml_loader():
    """omegaconf's YAML loader (the one `OmegaConf.load` uses: safe, floats like 1e-4, dates as text,
    duplicate keys and recursive aliases refused, alias expansion bounded), used directly so that a
    value is never turned into a node (where `${...}` would be an interpolation)."""
    try:
        from omegaconf._yaml import get_yaml_loader
    except ImportError:  # omegaconf < 2.4
        from omegaconf._utils import get_yaml_loader
    return get_yaml_loader()


def parse_yaml(text, what: str, max_bytes: int = MAX_RECORD_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """YAML text as plain data (see :func:`_yaml_loader`; no tags that build objects), bounded in size
    and nesting, never interpolated; RecordError naming `what`."""
    import yaml

    if len(text) > max_bytes:
        raise RecordError(f"{what}: {len(text):,} bytes of YAML, more than the {max_bytes:,} such a file ever needs")
    try:
        value = yaml.load(text, Loader=_yaml_loader())
    except RecursionError:
        raise RecordError(f"{what}: nested more than {max_depth} levels deep; not a file this code writes") from None
    except (yaml.YAMLError, ValueError) as error:  # also UnicodeDecodeError
        reason = getattr(error, "problem", None) or " ".join(str(error).split())  # without the wrapper's marks
        raise RecordError(f"{what}: not valid YAML here ({reason[:200]})") from None
    return check_nesting(value, what, max_depth)


def read_record(path, what: str, fmt: str = "json", max_bytes: int = MAX_RECORD_BYTES, max_depth: int = MAX_DEPTH,
                missing_ok: bool = False, follow_links: bool = False) -> Optional[Any]:
    """The record in file `path` (`fmt`: "json" or "yaml") as plain data; None for a missing file when
    `missing_ok` (FileNotFoundError otherwise). `what` names the file's role in messages ("provenance
    record"). RecordError for a link, FIFO or folder under the name (see utils.regular_files), a file
    larger than `max_bytes`, unparsable or nested deeper than `max_depth`, or unreadable."""
    try:
        data = read_regular(path, max_bytes, what, follow_links=follow_links)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except (OSError, ValueError) as error:
        raise RecordError(str(error) if not isinstance(error, OSError) or not error.errno
                          else f"{what} {path}: cannot read it ({error.strerror})") from None
    parse = parse_yaml if fmt == "yaml" else parse_json
    return parse(data, f"{what} {path}", max_bytes, max_depth)
