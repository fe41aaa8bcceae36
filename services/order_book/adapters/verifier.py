"""Verifies order signatures on a thread pool: libsodium releases the GIL, so verification uses every core."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import nacl.signing

from services.domain.credentials import verify_signature

Item = tuple[nacl.signing.VerifyKey, bytes, bytes]
# Calls with at most this many signatures verify them on the calling thread.
INLINE_MAX = 2


def _verify_chunk(items: Sequence[Item]) -> list[bool]:
    return [verify_signature(key, message, signature) for key, message, signature in items]


class SignatureVerifier:
    """`verify_many` splits the signatures of a call into one chunk per thread."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")

    async def verify_one(self, key: nacl.signing.VerifyKey, message: bytes, signature: bytes) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, verify_signature, key, message, signature)

    async def verify_many(self, items: Sequence[Item]) -> list[bool]:
        if not items:
            return []
        if len(items) <= INLINE_MAX:
            # A hop to the pool costs more than one verification (about 60 us) when
            # the cores are busy: the thread waits to be scheduled and for the GIL.
            return _verify_chunk(items)
        loop = asyncio.get_running_loop()
        # Chunks of about 64 keep both threads busy while the loop thread runs
        # the next request's Python work.
        chunk = max(16, min(256, -(-len(items) // (self.threads * 2))))
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
