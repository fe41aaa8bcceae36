"""Identifiers: time-ordered server ids, and participant ids derived from public keys.

An id is 26 Crockford base32 characters of a 130-bit number: 48 bits of Unix
milliseconds, a 24-bit sequence (random at each new millisecond, then
counting up) and 56 random bits, so ids made by one maker sort in creation
order, also within one millisecond.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time

_RFC4648 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_CROCKFORD = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = bytes.maketrans(_RFC4648, _CROCKFORD)


class IdMaker:
    """Makes ids in creation order, many at a time; not thread-safe (one owner, or `new_id`'s lock)."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._seq = 0

    def take(self, count: int) -> list[str]:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= self._last_ms:
            now_ms = self._last_ms
        else:
            self._last_ms = now_ms
            # A random start within the lower half of the counter leaves room to count up.
            self._seq = int.from_bytes(os.urandom(3), "big") >> 1
        noise = os.urandom(7 * count)
        ids = []
        for i in range(count):
            self._seq += 1
            if self._seq >= 1 << 24:
                # More than 2**23 ids in one millisecond: borrow the next one.
                self._last_ms += 1
                now_ms = self._last_ms
                self._seq = 0
            value = (now_ms << 80) | (self._seq << 56) | int.from_bytes(noise[7 * i : 7 * i + 7], "big")
            # 130 bits shifted to 136 are 17 bytes; their first 26 base32 characters are the id.
            ids.append(
                base64.b32encode((value << 6).to_bytes(17, "big"))[:26].translate(_TO_CROCKFORD).decode()
            )
        return ids


_shared = IdMaker()
_lock = threading.Lock()


def new_id() -> str:
    """One time-ordered id from the process's shared maker."""
    with _lock:
        return _shared.take(1)[0]


def participant_id_from_public_key(public_key: bytes) -> str:
    """A participant's id, derived from its Ed25519 public key as a blockchain address is.

    `p` followed by the first 20 bytes of SHA-256(public key) in hex.
    """
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return "p" + hashlib.sha256(public_key).digest()[:20].hex()
