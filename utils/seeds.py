"""Seeds derived by hashing: independent random streams that are pure functions of their keys."""
from __future__ import annotations

import hashlib

_MASK63 = (1 << 63) - 1


def derive_seed(seed: int, index: int, stream: str, *more: int) -> int:
    """A 63-bit seed that is a pure function of (stream, seed, index, *more).

    Different `stream` names give statistically independent generators, so one purpose's draws
    never reuse another's numbers (e.g. label dropout vs. posterior noise of the same micro-batch).
    """
    key = ":".join([stream, str(int(seed)), str(int(index)), *(str(int(m)) for m in more)])
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63
