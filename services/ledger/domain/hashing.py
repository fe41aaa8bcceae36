"""SHA-256 for the ledger's many short messages: the same digests as `hashlib.sha256`, from whichever implementation costs less per call here.

The ledger hashes a few short messages per transfer (an entry of about 200
bytes, 64-byte chain links, 65-byte Merkle nodes), so the cost of one call
matters more than the hashing speed. Which implementation is cheaper depends
on the machine: OpenSSL's (`hashlib.sha256`) with the CPU's SHA extensions
needs about 0.35 µs per 64-byte message on the 2-core benchmark machine and
0.4 µs per entry, CPython's own (`_sha256` on 3.11, `_sha2` from 3.12) 0.5 and
0.9 µs there; without SHA extensions, or with an OpenSSL that sets up each
call slowly, CPython's can be the cheaper one. Both compute the standard
SHA-256, so the choice changes no digest: it is made once, at import, by
timing a few hundred calls of each.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable
from typing import Protocol


class Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


_SAMPLES = (bytes(range(64)), bytes(200))
"""A chain link or Merkle node, and an entry: the messages the ledger hashes most."""


def _cost_s(constructor: Callable[[bytes], Hash]) -> float:
    """The fastest of a few timings of 100 calls per sample message."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for message in _SAMPLES:
            for _ in range(100):
                constructor(message).digest()
        best = min(best, time.perf_counter() - start)
    return best


def _cheapest_sha256() -> Callable[[bytes], Hash]:
    candidates: list[Callable[[bytes], Hash]] = [hashlib.sha256]
    for module, name in (("_sha2", "sha256"), ("_sha256", "sha256")):
        try:
            constructor: Callable[[bytes], Hash] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if constructor(b"abc").digest() == hashlib.sha256(b"abc").digest():
            candidates.append(constructor)
            break
    return min(candidates, key=_cost_s)


sha256: Callable[[bytes], Hash] = _cheapest_sha256()
"""SHA-256 of one message: `sha256(data).digest()`."""
