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

Specs are stored *compactly*: the bare name when no parameter is set, else ``{name, **params}``
(only the parameters given, coerced to their annotated types). :meth:`Registry.canonical` fills
in every default, so two specs that build the same thing compare equal whichever way they were
written (``lognormal`` == ``{name: lognormal}``), and a parameter added later with a default
leaves older specs equal to their canonical form.
"""
from __future__ import annotations

import difflib
import inspect
import math
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["Registry", "RegistryError", "SpecDefault"]


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


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _annotation(entry, name: str):
    """The evaluated type annotation of parameter ``name`` of ``entry`` (Any when there is none)."""
    target = entry.__init__ if inspect.isclass(entry) else entry
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: no type check
        hints = {}
    return hints.get(name, Any)


def _coerce(value, annotation, where: str):
    """``value`` as the annotated type (int -> float where a float is wanted); RegistryError otherwise."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else Any
        origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise RegistryError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise RegistryError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RegistryError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise RegistryError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RegistryError(f"{where} must be a string, got {value!r}")
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
        out = {}
        for key, value in given.items():
            if hasattr(value, "items") and not isinstance(value, Mapping):  # omegaconf containers
                value = dict(value.items())
            elif hasattr(value, "__iter__") and type(value).__name__ == "ListConfig":
                value = list(value)
            out[key] = _coerce(value, _annotation(entry, key), f"{self.kind} {name!r}: parameter {key!r}")
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
            ann = _annotation(self[name], key)
            kind = getattr(ann, "__name__", None) if ann is not Any else None
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
