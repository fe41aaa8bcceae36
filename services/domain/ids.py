"""Identifiers: time-ordered server ids, event ids, and participant ids derived from public keys."""

from __future__ import annotations

import hashlib
import os
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_seq = 0


def new_id() -> str:
    """A 26-character, lexicographically time-ordered id (ULID-like, Crockford base32).

    Ids made in one process sort in creation order, also within one millisecond.
    """
    global _last_ms, _seq
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            now_ms = _last_ms
            _seq += 1
        else:
            _last_ms = now_ms
            # A random start within the lower half of the counter leaves room to count up.
            _seq = int.from_bytes(os.urandom(3), "big") >> 1
        value = (now_ms << 80) | (_seq << 56) | int.from_bytes(os.urandom(7), "big")
    return _b32(value, 26)


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def participant_id_from_public_key(public_key: bytes) -> str:
    """A participant's id, derived from its Ed25519 public key as a blockchain address is.

    `p` followed by the first 20 bytes of SHA-256(public key) in hex.
    """
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return "p" + hashlib.sha256(public_key).digest()[:20].hex()
