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

The per-transfer work (entry hashes and chain links, one Merkle level at a
time, the short digests in transfer ids, the transfers' rows for
PostgreSQL's COPY, and compact JSON) is also offered for many transfers at
once: `leaves_and_heads`, `pair_up_level`, `short_hex_digests`, `copy_rows`,
`compact_json`. They
run in the compiled module `services.ledger._native` when it was built (it is
built by `pip install`, which needs a C compiler and Python's headers), and
in Python otherwise; both give the same bytes (`NATIVE` says which runs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol


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


ENTRY_PREFIX = "p2pgrid-transfer-v1"
"""The first field of every transfer's entry (see services/ledger/domain/chain.py)."""


def python_leaves_and_heads(transfers: Sequence[Sequence[Any]], previous: bytes) -> tuple[bytes, bytes]:
    """The entry hashes of `transfers` and their chained hashes after `previous`, each joined into one byte string."""
    sha = sha256
    prefix = f"\x00{ENTRY_PREFIX}|"
    leaves = [
        sha(f"{prefix}{tid}|{debit}|{credit}|{amount}|{code}|{start}|{group}|{flags}".encode()).digest()
        for tid, debit, credit, amount, code, start, group, flags in transfers
    ]
    heads: list[bytes] = []
    push = heads.append
    for h in leaves:
        previous = sha(previous + h).digest()
        push(previous)
    return b"".join(leaves), b"".join(heads)


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


def _native_module() -> ModuleType | None:
    try:
        return importlib.import_module("services.ledger._native")
    except ImportError:
        return None


_native = _native_module()
NATIVE: str | None = None if _native is None else str(_native.IMPLEMENTATION)
"""How the compiled module hashes ("SHA extensions" or "portable C"), or None when it is not built."""


def leaves_and_heads(transfers: Sequence[Sequence[Any]], previous: bytes) -> tuple[bytes, bytes]:
    """As `python_leaves_and_heads`; compiled when built. A field that is neither str nor a 64-bit
    int (which no well-formed transfer has) is written by Python."""
    if _native is not None:
        try:
            result: tuple[bytes, bytes] = _native.leaves_and_heads(transfers, previous)
            return result
        except (TypeError, OverflowError):
            pass
    return python_leaves_and_heads(transfers, previous)


def python_copy_rows(first_seq: int, transfers: Sequence[Sequence[Any]]) -> bytes:
    """PostgreSQL COPY text rows: each transfer's sequence number (from `first_seq`) and fields,
    tab-separated, one line each. No field is escaped: the caller passes none with a tab, newline or
    backslash."""
    return "".join(
        [
            f"{seq}\t{tid}\t{debit}\t{credit}\t{amount}\t{code}\t{start}\t{group}\t{flags}\n"
            for seq, (tid, debit, credit, amount, code, start, group, flags) in enumerate(
                transfers, first_seq
            )
        ]
    ).encode()


def copy_rows(first_seq: int, transfers: Sequence[Sequence[Any]]) -> bytes:
    """As `python_copy_rows`; compiled when built."""
    if _native is not None:
        try:
            rows: bytes = _native.copy_rows(first_seq, transfers)
            return rows
        except (TypeError, OverflowError):
            pass
    return python_copy_rows(first_seq, transfers)


pair_up_level: Callable[[bytes], bytes] = python_pair_up_level if _native is None else _native.pair_up
"""As `python_pair_up_level`; compiled when built."""

short_hex_digests: Callable[[Sequence[str], int], list[str]] = (
    python_short_hex_digests if _native is None else _native.short_hex_digests
)
"""As `python_short_hex_digests`; compiled when built."""


def compact_json(obj: object) -> bytes:
    """`json.dumps(obj, separators=(",", ":")).encode()`; compiled when built, for documents of dicts,
    lists, tuples, ints and printable ASCII text (anything else is written by the json module)."""
    if _native is not None:
        try:
            text: bytes = _native.plain_json(obj)
            return text
        except ValueError:
            pass
    return json.dumps(obj, separators=(",", ":")).encode()
