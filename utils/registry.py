"""Named extension points: a registry maps names to classes or functions whose signature is their config.

    DECOMPOSITIONS = Registry("decomposition", default="laplacian", context=("num_stages",))

    @DECOMPOSITIONS.register("laplacian")
    class LaplacianPyramid(Decomposition):
        def __init__(self, num_stages: int, scales=None): ...

A config names an entry by a *spec*: its name (``laplacian``), or a mapping with the name and
parameters (``{name: logit_normal, loc: 0.0, scale: 1.0}``). The entry's own signature is the
whole schema: the keyword parameters after the ``context`` ones (those the caller supplies: the
number of stages, the hidden size, ...) are what a spec may set, with their annotated types and
defaults. So registering an entry is all it takes for config validation, ``--help`` and storage
in checkpoints; nothing else lists the names.

A parameter's range is part of its annotation: ``depth: Annotated[int, AtLeast(1)]``,
``mlp_ratio: Annotated[float, Above(0)]``, ``p: Annotated[float, Between(0, 1)]``. The same
annotations make a model class's constructor its schema: :func:`check_arguments` coerces and
checks any callable's keyword arguments by them (``models.registry`` checks every model option
from the command line, YAML and a stored arch there).

Specs are stored *compactly*: the bare name when no parameter is set, else ``{name, **params}``
(only the parameters given, coerced to their annotated types). :meth:`Registry.canonical` fills
in every default, so two specs that build the same thing compare equal whichever way they were
written (``lognormal`` == ``{name: lognormal}``), and a parameter added later with a default
leaves older specs equal to their canonical form.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["Registry", "RegistryError", "SpecDefault", "Range", "AtLeast", "Above", "Between", "check_arguments"]


class RegistryError(ValueError):
    """A spec that names no registered entry, or a parameter the entry does not take (one line)."""


class SpecDefault(str):
    """The default of a constructor argument that takes a spec of ``registry``: a plain string
    (the default entry's name) that also knows its registry, so that generic code (checkpoint
    arch comparison, ``--help``) can normalise the argument without a list of such arguments."""

    registry: "Registry"

    def __new__(cls, name: str, registry: "Registry"):
        obj = super().__new__(cls, name)
        obj.registry = registry
        return obj


@dataclass(frozen=True)
class Range:
    """``typing.Annotated`` metadata: the value lies in ``[low, high]`` (None: unbounded on that
    side; ``low_open`` / ``high_open``: the end itself is excluded). Write it with
    :func:`AtLeast`, :func:`Above` or :func:`Between`."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}" if self.high is not None else ""


def _number(x) -> str:
    if x is None:
        return ""
    return str(int(x)) if isinstance(x, int) or (isinstance(x, float) and x.is_integer()) else f"{x:g}"


def AtLeast(low: float) -> Range:  # noqa: N802 - reads as a type annotation
    """``value >= low``."""
    return Range(low=low)


def Above(low: float) -> Range:  # noqa: N802
    """``value > low``."""
    return Range(low=low, low_open=True)


def Between(low: float, high: float, high_open: bool = False) -> Range:  # noqa: N802
    """``low <= value <= high`` (``< high`` with ``high_open``)."""
    return Range(low=low, high=high, high_open=high_open)


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _annotation(entry, name: str):
    """The evaluated type annotation of parameter ``name`` of ``entry`` (Any when there is none),
    ``Annotated`` ranges kept."""
    target = entry.__init__ if inspect.isclass(entry) else entry
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: no type check
        hints = {}
    return hints.get(name, Any)


def _plain(value):
    """omegaconf containers as a dict / list (values read from YAML and the command line)."""
    if hasattr(value, "items") and not isinstance(value, Mapping):
        return dict(value.items())
    if hasattr(value, "__iter__") and type(value).__name__ == "ListConfig":
        return list(value)
    return value


def check_arguments(target: Callable, values: Mapping[str, Any], what: str) -> Dict[str, Any]:
    """``values`` (keyword arguments of ``target``, a function or class) coerced to the annotated
    types of ``target``'s parameters and checked against their ranges: RegistryError naming
    ``what`` and the parameter otherwise (``model option 'depth' must be an integer >= 1, got 0``).
    Names that are not parameters of ``target`` pass unchecked (the caller decides about them)."""
    return {key: _coerce(_plain(value), _annotation(target, key), f"{what} {key!r}") for key, value in values.items()}


def _type_text(annotation) -> str:
    """``int``, ``int >= 1``, ``float in [0, 1]`` for ``--help`` ('' when unannotated)."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        ranges = " ".join(r.text() for r in extras if isinstance(r, Range))
        return " ".join(part for part in (_type_text(base), ranges) if part)
    return getattr(annotation, "__name__", "") if annotation is not Any else ""


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range (a 400-digit number)
        return False


def _short(value) -> str:
    """``repr(value)``, cut to 80 characters (a 10**6-digit number stays one short line)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(value, annotation, where: str):
    """``value`` as the annotated type (int -> float where a float is wanted), inside the annotated
    range; RegistryError otherwise."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        value = _coerce(value, base, where)
        for bound in extras:
            if isinstance(bound, Range) and value is not None and not bound.holds(value):
                kind = _TYPE_NAMES.get(base, "a value")
                kind = "a finite number" if base is float else kind
                raise RegistryError(f"{where} must be {kind} {bound.text()}, got {_short(value)}")
        return value
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else Any
        if typing.get_origin(annotation) is typing.Annotated:
            return _coerce(value, annotation, where)
        origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence) or annotation in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise RegistryError(f"{where} must be a list, got {_short(value)}")
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise RegistryError(f"{where} must be true or false, got {_short(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise RegistryError(f"{where} must be a finite number, got {_short(value)}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise RegistryError(f"{where} must be an integer, got {_short(value)}")
        return int(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RegistryError(f"{where} must be a string, got {_short(value)}")
        return value
    return value


class Registry:
    """Names -> entries (classes or functions) of one kind of extension point.

    ``kind``: what the entries are ("decomposition"), used in messages and ``--help``;
    ``default``: the name a null spec means; ``context``: parameter names the caller passes to
    every entry (never set from a config); ``aliases``: other spellings of entry names (the
    reference's ``prediction: v``), read as the entry's name and stored as it.
    """

    def __init__(self, kind: str, default: Optional[str] = None, context: Tuple[str, ...] = (),
                 aliases: Optional[Mapping[str, str]] = None):
        self.kind = kind
        self.default_name = default
        self.context = tuple(context)
        self.aliases = dict(aliases or {})
        self._entries: Dict[str, Callable] = {}

    # ------------------------------------------------------------------ entries
    def register(self, name: Optional[str] = None, *, replace: bool = False):
        """Decorator: ``@REGISTRY.register("name")`` (default: the object's ``__name__``, lower case).
        Registering a taken name is an error unless ``replace`` (tests re-registering their entry)."""
        def add(entry):
            key = name or entry.__name__.lower()
            if key in self._entries and self._entries[key] is not entry and not replace:
                raise ValueError(f"{self.kind} {key!r} is registered already ({self._entries[key].__qualname__})")
            self._params_of(entry)  # a signature without named parameters fails here, not at first use
            self._entries[key] = entry
            entry.registered_name = key
            return entry
        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Callable:
        if name not in self._entries:
            raise RegistryError(self._unknown(name))
        return self._entries[name]

    def default(self) -> SpecDefault:
        """The default spec, for a constructor argument: ``mlp=MLPS.default()``."""
        return SpecDefault(self.default_name, self)

    def _unknown(self, name) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"unknown {self.kind} {name!r}{hint}; registered in this checkout: {', '.join(self.names())} "
                f"(a new one is a class or function registered in the module that holds them, see docs/EXTENDING.md)")

    def _params_of(self, entry) -> Dict[str, inspect.Parameter]:
        """The parameters a spec may set: the keyword-capable ones after the context parameters."""
        target = entry.__init__ if inspect.isclass(entry) else entry
        params = list(inspect.signature(target).parameters.values())
        if inspect.isclass(entry):
            params = params[1:]  # self
        return {p.name: p for p in params if p.name not in self.context
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def params(self, name: str) -> Dict[str, Any]:
        """``{parameter: default}`` of entry ``name`` (``inspect.Parameter.empty`` for required ones)."""
        return {k: p.default for k, p in self._params_of(self[name]).items()}

    # ------------------------------------------------------------------ specs
    def split(self, spec) -> Tuple[str, dict]:
        """``(name, given parameters)`` of a spec (None: the default), checked against the entry's
        signature and coerced to the annotated types. RegistryError with one line otherwise."""
        if spec is None:
            if self.default_name is None:
                raise RegistryError(f"no {self.kind} given (registered: {', '.join(self.names())})")
            spec = self.default_name
        if isinstance(spec, str):
            name, given = spec, {}
        elif isinstance(spec, Mapping):
            given = {str(k): v for k, v in dict(spec).items()}
            if "name" not in given:
                raise RegistryError(f"a {self.kind} given as a mapping needs a 'name' (one of "
                                    f"{', '.join(self.names())}), got {dict(spec)!r}")
            name = given.pop("name")
        else:
            raise RegistryError(f"a {self.kind} is a name ({', '.join(self.names())}) or a mapping "
                                f"{{name: ..., parameter: value}}, got {spec!r}")
        name = self.aliases.get(str(name), str(name))
        entry = self[name]
        allowed = self._params_of(entry)
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise RegistryError(f"{self.kind} {name!r} takes no parameter {unknown[0]!r}; "
                                f"its parameters: {self.signature_text(name) or 'none'}")
        out = check_arguments(entry, given, f"{self.kind} {name!r}: parameter")
        missing = [k for k, p in allowed.items() if p.default is inspect.Parameter.empty and k not in out]
        if missing:
            raise RegistryError(f"{self.kind} {name!r} needs the parameter(s) {', '.join(missing)}; "
                                f"its parameters: {self.signature_text(name)}")
        return str(name), out

    def compact(self, spec):
        """The spec as stored in configs and checkpoints: the name, or ``{name, **given parameters}``."""
        name, given = self.split(spec)
        return name if not given else {"name": name, **given}

    def canonical(self, spec) -> dict:
        """``{name, **every parameter}`` (defaults filled in): equal for specs that build the same thing."""
        name, given = self.split(spec)
        full = {k: v for k, v in self.params(name).items() if v is not inspect.Parameter.empty}
        full.update(given)
        return {"name": name, **full}

    def build(self, spec, **context):
        """The entry of ``spec`` called with the caller's ``context`` and the spec's parameters."""
        name, given = self.split(spec)
        return self[name](**context, **given)

    def tag(self, spec) -> str:
        """A short, file-name-safe label: ``lognormal``, ``logit_normal-loc0.5-scale1``."""
        name, given = self.split(spec)
        parts = [name] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(given.items())]
        return "-".join(str(p) for p in parts)

    # ------------------------------------------------------------------ help
    def signature_text(self, name: str) -> str:
        items = []
        for key, default in self.params(name).items():
            kind = _type_text(_annotation(self[name], key))
            text = key + (f": {kind}" if kind else "")
            items.append(text if default is inspect.Parameter.empty else f"{text} = {default!r}")
        return ", ".join(items)

    def describe(self) -> List[str]:
        """``--help`` lines: every entry with its parameters and the first line of its docstring."""
        lines = []
        for name, entry in self._entries.items():
            paragraph = " ".join((inspect.getdoc(entry) or "").strip().split("\n\n")[0].split())
            sentence = paragraph.split(". ")[0].rstrip(".")
            first = f"   # {sentence}" if sentence else ""
            default = " (default)" if name == self.default_name else ""
            default += "".join(f" (also {alias!r})" for alias, target in self.aliases.items() if target == name)
            lines.append(f"    {name}({self.signature_text(name)}){default}{first}")
        return lines
