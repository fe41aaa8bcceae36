"""Verifies order signatures on a thread pool: libsodium releases the GIL, so verification uses every core.

A large call's signatures are split into chunks, one pool task each. A
call with a few signatures verifies them on the calling thread: a hand-off
to the pool and back costs more CPU than one verification (about 60 us)
when the two cores are busy, and single-order calls are then bound by the
event loop, not by verification.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import nacl.signing

from services.domain.credentials import verify_signature

Item = tuple[nacl.signing.VerifyKey, bytes, bytes]
# Calls with at most this many signatures verify them on the calling thread.
INLINE_MAX = 4
CHUNK_MIN = 16
CHUNK_MAX = 256


def _verify_chunk(items: Sequence[Item]) -> list[bool]:
    return [verify_signature(key, message, signature) for key, message, signature in items]


class SignatureVerifier:
    """Checks Ed25519 signatures off the event loop thread."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")

    async def verify_many(self, items: Sequence[Item]) -> list[bool]:
        if not items:
            return []
        if len(items) <= INLINE_MAX:
            return _verify_chunk(items)
        loop = asyncio.get_running_loop()
        # Several chunks per thread keep every thread busy while the loop runs the next request.
        chunk = max(CHUNK_MIN, min(CHUNK_MAX, -(-len(items) // (self.threads * 2))))
        futures = [
            loop.run_in_executor(self._pool, _verify_chunk, items[start : start + chunk])
            for start in range(0, len(items), chunk)
        ]
        results: list[bool] = []
        for part in await asyncio.gather(*futures):
            results.extend(part)
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
