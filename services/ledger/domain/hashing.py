"""SHA-256 for the ledger's many short messages: the same digests as `hashlib.sha256`, at less cost per call.

The ledger hashes a few short messages per transfer (an entry of about 200
bytes, 64-byte chain links, 65-byte Merkle nodes). On Python 3.11 with
OpenSSL 3, `hashlib.sha256` spends more on setting up each call than on
hashing such a message (about 2.3 µs per 64-byte message on the 2-core
benchmark machine), while CPython's own SHA-256 (`_sha256` on 3.11, `_sha2`
from 3.12) needs about 1.1 µs. Both compute the standard SHA-256, so the
choice changes no digest; where neither module exists, hashlib's is used.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import Protocol


class Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


def _fastest_sha256() -> Callable[[bytes], Hash]:
    for module, name in (("_sha2", "sha256"), ("_sha256", "sha256")):
        try:
            constructor: Callable[[bytes], Hash] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if constructor(b"abc").digest() == hashlib.sha256(b"abc").digest():
            return constructor
    return hashlib.sha256


sha256: Callable[[bytes], Hash] = _fastest_sha256()
"""SHA-256 of one message: `sha256(data).digest()`."""
