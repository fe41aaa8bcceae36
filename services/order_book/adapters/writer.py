"""The single writer: queues place, amend, cancel and freeze operations and commits them in groups.

Requests that arrive while a transaction is being committed wait and go into
the next one together (group commit), so one durable commit serves many
orders, and every answer is sent only after its transaction committed. A
freeze goes through the same queue, so each order either commits before its
interval's freeze (and is in the clearing request) or is refused after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from services.domain.intervals import Clock
from services.order_book.adapters.store import (
    AmendOp,
    BookStore,
    CancelOp,
    FreezeOp,
    Op,
    PlaceOp,
    WriteOutcome,
)
from services.order_book.domain.errors import Unavailable

log = logging.getLogger(__name__)

OpT = TypeVar("OpT", bound=Op)


def _size(op: Op) -> int:
    return len(op.orders) if isinstance(op, PlaceOp) else 1


class BookWriter:
    """Commits queued operations in groups of up to `max_orders` orders, one transaction per group."""

    def __init__(
        self,
        store: BookStore,
        clock: Clock,
        *,
        max_orders: int = 4000,
        on_commit: Callable[[WriteOutcome], None] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_orders = max_orders
        self.on_commit = on_commit
        self._queue: list[tuple[Op, asyncio.Future[Op]]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._closing = False
        # One thread holds the writing connection's work; transactions never overlap.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="book-writer")

    async def submit(self, op: OpT) -> OpT:
        """Queue `op` and return it, its result slot filled, once its transaction committed."""
        if self._closing:
            raise Unavailable("the order book is shutting down; retry with the same client_order_id")
        future: asyncio.Future[Op] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if not self._wake.is_set():
            self._wake.set()
        await future
        return op

    async def place(self, op: PlaceOp) -> PlaceOp:
        return await self.submit(op)

    async def amend(self, op: AmendOp) -> AmendOp:
        return await self.submit(op)

    async def cancel(self, op: CancelOp) -> CancelOp:
        return await self.submit(op)

    async def freeze(self, op: FreezeOp) -> FreezeOp:
        return await self.submit(op)

    def _take(self) -> list[tuple[Op, asyncio.Future[Op]]]:
        taken = 0
        count = 0
        for op, _future in self._queue:
            size = _size(op)
            if count and taken + size > self.max_orders:
                break
            taken += size
            count += 1
        group, self._queue = self._queue[:count], self._queue[count:]
        return group

    def close(self) -> None:
        """Stop once the queue is empty; later submissions are refused as UNAVAILABLE."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Commit queued groups until `close()` was called and the queue is empty."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        self._closing = True
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                group = self._take()
                ops = [op for op, _future in group]
                try:
                    outcome = await loop.run_in_executor(
                        self._thread, self.store.apply_ops, ops, self.clock.now_s()
                    )
                except Exception:
                    log.exception("storing %d operations failed; their callers may retry", len(ops))
                    for _op, future in group:
                        if not future.done():
                            future.set_exception(
                                Unavailable(
                                    "the order book could not store this; retry with the same client_order_id"
                                )
                            )
                    await asyncio.sleep(0.05)
                    continue
                for op, future in group:
                    if not future.done():
                        future.set_result(op)
                if self.on_commit is not None:
                    self.on_commit(outcome)
        finally:
            # The writer's driver connection belongs to its thread: close it there.
            self._thread.submit(self.store.close)
            self._thread.shutdown(wait=True)
