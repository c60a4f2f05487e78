"""Which CPU kernels a machine runs, told by their outputs: the fingerprint of the frozen fixtures.

The frozen checkpoints (tests/data/frozen) were written on one machine; the frozen tests compare
bit for bit where the kernels are the same and with a tolerance elsewhere. The CPU capability string
and torch version do not tell "the same kernels": an Intel AVX512 machine reports what the AMD EPYC
that made the fixtures reports, yet its BLAS takes other code paths and the results differ in the 8th
digit. So the kernels are identified by what they compute:

* :func:`record` runs a function under a dispatch mode and keeps every arithmetic aten call (the
  operator, its tensors' shapes, strides and dtypes, its other arguments), once per distinct call;
* :func:`replay` calls each of them again on fixed inputs (made from integers, the same on every
  machine) with one thread, and returns the SHA-256 of all their outputs.

``tests/data/frozen/kernels.json`` holds the calls the fixtures' sampling and training make and
their fingerprint on the machine kind that made the fixtures (written by ``make_kernels.py``); a
machine whose replay gives the same fingerprint computes every one of those calls bit for bit as
that machine did. The inputs' values differ from the real run's, which can only hide a value-
dependent kernel choice (none of torch's CPU matmul, convolution, attention or normalisation
kernels choose by value).
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Calls that compute nothing (allocation, views, bookkeeping) or read memory they do not set.
_SKIP = {"aten." + name for name in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "lift_fresh", "detach", "alias",
    "_local_scalar_dense", "resize_", "view", "_unsafe_view", "as_strided", "select", "slice", "t", "transpose",
    "permute", "expand", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "narrow")}


class _Unsupported(Exception):
    pass


def _encode(value):
    """A JSON-able description of one argument (tensors by their layout, generators by nothing)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": [list(value.shape), list(value.stride()), str(value.dtype).removeprefix("torch.")]}
    if isinstance(value, torch.Generator):
        return {"generator": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {"enum": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise _Unsupported(type(value).__name__)


def record(fn: Callable[[], object]) -> List[dict]:
    """The distinct arithmetic aten calls ``fn()`` makes (in first-call order), as JSON-able dicts."""
    calls, seen = [], set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func.overloadpacket)
            if name not in _SKIP and func.namespace == "aten":
                try:
                    call = {"op": str(func.name()), "args": [_encode(a) for a in args],
                            "kwargs": {k: _encode(v) for k, v in kwargs.items()}}
                except _Unsupported:
                    call = None
                key = json.dumps(call, sort_keys=True)
                if call is not None and key not in seen:
                    seen.add(key)
                    calls.append(call)
            return func(*args, **kwargs)

    with Recorder():
        fn()
    return calls


def _decode(spec, counter: List[int]):
    if "tensor" in spec:
        shape, stride, dtype = spec["tensor"]
        dtype = getattr(torch, dtype)
        size = 1 + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0) if all(shape) else 0
        counter[0] += 1
        g = torch.Generator().manual_seed(counter[0])
        if dtype.is_floating_point or dtype.is_complex:
            # values in (0, 1): valid for log, sqrt, reciprocal, ...
            base = (torch.randint(1, 1000, (size,), generator=g) / 1000).to(dtype)
        elif dtype == torch.bool:
            base = torch.ones(size, dtype=dtype)
        else:
            base = torch.zeros(size, dtype=dtype)  # indices: 0 is valid for every table
        return base.as_strided(shape, stride)
    if "generator" in spec:
        counter[0] += 1
        return torch.Generator().manual_seed(counter[0])
    if "dtype" in spec:
        return getattr(torch, spec["dtype"])
    if "device" in spec:
        return torch.device(spec["device"])
    if "enum" in spec:
        return getattr(torch, spec["enum"])
    if "list" in spec:
        return [_decode(v, counter) for v in spec["list"]]
    return spec["value"]


def _digest(out, h) -> None:
    if isinstance(out, torch.Tensor):
        h.update(str((tuple(out.shape), out.dtype)).encode())
        h.update(out.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if out.numel() else b"")
    elif isinstance(out, (list, tuple)):
        for item in out:
            _digest(item, h)
    else:
        h.update(repr(out).encode())


def replay(calls: List[dict]) -> str:
    """SHA-256 (hex) of the outputs of ``calls`` (from :func:`record`) on fixed inputs, one thread;
    calls that draw from the global generator find it seeded with their index."""
    h = hashlib.sha256()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            for i, call in enumerate(calls):
                packet, _, overload = call["op"].removeprefix("aten::").partition(".")
                op = getattr(getattr(torch.ops.aten, packet), overload or "default")
                counter = [i * 1000]
                args = [_decode(a, counter) for a in call["args"]]
                kwargs = {k: _decode(v, counter) for k, v in call["kwargs"].items()}
                torch.manual_seed(i)
                h.update(call["op"].encode())
                try:
                    _digest(op(*args, **kwargs), h)
                except Exception as error:  # noqa: BLE001 - a call invalid on fixed inputs: its error is its output
                    h.update(type(error).__name__.encode())
    finally:
        torch.set_num_threads(threads)
    return h.hexdigest()
