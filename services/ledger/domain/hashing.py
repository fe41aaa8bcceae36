"""SHA-256 for the ledger's many short messages, and its per-transfer work on many transfers at once, compiled where built.

`sha256` gives the same digests as `hashlib.sha256`, from whichever
implementation costs less per call here.

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

The compiled module `services.ledger._native` (`native` here; built by
`pip install`, which needs a C compiler and Python's headers) does the
ledger's per-transfer work on many transfers at once; each of its functions
has a Python twin that gives the same bytes, used when it is not built
(`NATIVE` says which runs). Here: one Merkle level at a time
(`pair_up_level`), the short digests in transfer ids (`short_hex_digests`)
and compact JSON (`compact_json`); the entry hashes and chain links are in
`chain.py`, the COPY rows in the SQL adapter.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
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


def python_pair_up_level(nodes: bytes) -> bytes:
    """32-byte `nodes` hashed two by two into the next Merkle level, SHA-256(0x01 || left || right)."""
    if len(nodes) % 32:
        raise ValueError("nodes must be a whole number of 32-byte hashes")
    sha = sha256
    return b"".join(
        [sha(b"\x01" + nodes[i : i + 64]).digest() for i in range(0, len(nodes) - len(nodes) % 64, 64)]
    )


def python_short_hex_digests(messages: Sequence[str], digits: int) -> list[str]:
    """The first `digits` hex digits of the SHA-256 of each message's UTF-8 encoding."""
    if not 0 <= digits <= 64:
        raise ValueError("digits must be between 0 and 64")
    sha = sha256
    return [sha(m.encode()).hexdigest()[:digits] for m in messages]


try:
    from services.ledger import _native
except ImportError:  # pragma: no cover - a build without a C compiler
    _native = None  # type: ignore[assignment]
native = _native
"""The compiled module built from services/ledger/_native.c, or None; every module of the ledger
that uses it takes it from here."""

NATIVE: str | None = None if native is None else native.IMPLEMENTATION
"""How the compiled module hashes ("SHA extensions" or "portable C"), or None when it is not built."""


pair_up_level: Callable[[bytes], bytes] = python_pair_up_level if native is None else native.pair_up
"""As `python_pair_up_level`; compiled when built."""

short_hex_digests: Callable[[Sequence[str], int], list[str]] = (
    python_short_hex_digests if native is None else native.short_hex_digests
)
"""As `python_short_hex_digests`; compiled when built."""


def compact_json(obj: object) -> bytes:
    """`json.dumps(obj, separators=(",", ":")).encode()`; compiled when built, for documents of dicts,
    lists, tuples, ints and printable ASCII text (anything else is written by the json module)."""
    if native is not None:
        try:
            return native.plain_json(obj)
        except ValueError:
            pass
    return json.dumps(obj, separators=(",", ":")).encode()
