"""Gate closure and clearing results: freezes each interval on the service clock and turns results into fills.

`GateKeeper` freezes intervals in order, starting after the last one frozen
(or at the first interval that could hold orders), so after a crash or a
pause it catches up on every gate that passed meanwhile. `ResultConsumer`
applies each ClearingResultEvent from the CLEARING stream exactly once (the
inbox row and the fills commit together) and then wakes the fill streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy import Connection

from services.domain.errors import DomainError
from services.domain.intervals import Clock
from services.order_book.adapters.store import BookStore, FreezeOp
from services.order_book.adapters.writer import BookWriter
from services.order_book.book import MarketFeed, Signal, wait_any
from services.order_book.domain.market import IntervalCleared, MarketRules
from services.platform.metrics import Metrics
from services.platform.nats_bus import Delivery, NatsBus
from services.platform.outbox import consume_exactly_once
from services.platform.subjects import CLEARING_RESULT

log = logging.getLogger(__name__)


class GateKeeper:
    """Freezes interval after interval as their gate times pass on the service clock."""

    def __init__(self, rules: MarketRules, clock: Clock, writer: BookWriter, first_start_s: int) -> None:
        self.rules = rules
        self.clock = clock
        self.writer = writer
        self.next_start_s = first_start_s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            gate_s = self.rules.gate_time_s(self.next_start_s)
            if self.clock.now_s() < gate_s:
                await wait_any(stop, timeout_s=60.0, until=self.clock.sleep_until(gate_s))
                continue
            try:
                await self.writer.freeze(FreezeOp(self.next_start_s))
            except DomainError as exc:
                log.error("freezing interval %d failed: %s; retrying", self.next_start_s, exc)
                await wait_any(stop, timeout_s=1.0)
                continue
            self.next_start_s += self.rules.interval_s


class ResultConsumer:
    """Applies clearing results exactly once and announces them to fill and market data streams."""

    def __init__(
        self,
        bus: NatsBus,
        store: BookStore,
        feed: MarketFeed,
        fills_signal: Signal,
        metrics: Metrics,
        durable: str,
        on_fills: Callable[[int], None] | None = None,
    ) -> None:
        self.bus = bus
        self.store = store
        self.feed = feed
        self.fills_signal = fills_signal
        self.metrics = metrics
        self.durable = durable
        self.on_fills = on_fills
        self._cleared: list[tuple[IntervalCleared, int]] = []

    def _apply(self, conn: Connection, delivery: Delivery) -> None:
        applied = self.store.apply_clearing_result(conn, delivery.event_id, delivery.data)
        if applied is not None:
            self._cleared.append(applied)

    def _after_commit(self, _deliveries: list[Delivery]) -> None:
        applied, self._cleared = self._cleared, []
        if applied:
            self.feed.publish([cleared for cleared, _fills in applied])
            self.fills_signal.notify()
            if self.on_fills is not None:
                self.on_fills(sum(fills for _cleared, fills in applied))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._cleared = []
            try:
                await consume_exactly_once(
                    self.bus,
                    self.store.engine,
                    stream="CLEARING",
                    durable=self.durable,
                    filter_subject=f"{CLEARING_RESULT}.>",
                    apply=self._apply,
                    stop=stop,
                    metrics=self.metrics,
                    batch=16,
                    after_commit=self._after_commit,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consuming clearing results failed; retrying")
                await wait_any(stop, timeout_s=1.0)
