"""The periodic settlement: settles every due interval, announces it through the outbox, and records the metrics.

Each settlement revision commits its transfers, its checkpoint, its
`IntervalSettled` event and its `CheckpointEvent` in one transaction, so the
events exist if and only if the settlement does; the outbox relay publishes
them with their deterministic ids (`ledger-settled-<interval>-r<revision>`,
`ledger-checkpoint-<tree size>`) as Nats-Msg-Id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from sqlalchemy import Connection

from services.domain.intervals import Clock
from services.ledger.adapters.consumers import FATAL_ERRORS, wait_stop
from services.ledger.adapters.events import checkpoint_event, settled_event
from services.ledger.adapters.sql import LedgerStore
from services.ledger.domain.outcomes import SettlementOutcome, SettlementStatus
from services.ledger.domain.settlement import CODE_PURCHASE, SettlementRules
from services.platform.metrics import Metrics
from services.platform.outbox import add_to_outbox
from services.platform.subjects import LEDGER_CHECKPOINT, LEDGER_SETTLED, keyed

log = logging.getLogger(__name__)

SETTLE_LIMIT = 100
"""Intervals settled per call; when there were that many, the next call follows at once."""


@dataclass(frozen=True, slots=True)
class Settled:
    """One committed settlement revision and what it booked per transfer code: (count, amount_nano)."""

    outcome: SettlementOutcome
    by_code: dict[str, tuple[int, int]] = field(default_factory=dict)


class Settler:
    """Calls `settle_due` every period on the writer thread; a broken ledger stops the service."""

    def __init__(
        self,
        *,
        store: LedgerStore,
        rules: SettlementRules,
        writer: Executor,
        clock: Clock,
        metrics: Metrics,
        period_s: float,
        on_events: Callable[[], None],
    ) -> None:
        self.store = store
        self.rules = rules
        self.writer = writer
        self.clock = clock
        self.metrics = metrics
        self.period_s = period_s
        self.on_events = on_events
        self._reported: set[tuple[str, int, str]] = set()

    def settle_once(self) -> list[Settled]:
        """Settle what is due, each interval in its own transaction with its events (writer thread)."""
        booked: dict[tuple[str, int, int], dict[str, tuple[int, int]]] = {}

        def on_settled(conn: Connection, outcome: SettlementOutcome) -> None:
            by_code: dict[str, tuple[int, int]] = {}
            if outcome.transfer_count:
                last_seq = outcome.first_seq + outcome.transfer_count - 1
                for stored in self.store.transfers_in_range(outcome.first_seq, last_seq, connection=conn):
                    t = stored.transfer
                    count, amount = by_code.get(t.code, (0, 0))
                    by_code[t.code] = (count + 1, amount + t.amount_nano)
            emitted_at_ms = int(time.time() * 1000)
            start_s = outcome.interval_start_s
            event = settled_event(outcome, by_code.get(CODE_PURCHASE, (0, 0))[1], emitted_at_ms)
            add_to_outbox(
                conn, keyed(LEDGER_SETTLED, start_s), event.SerializeToString(), event.header.event_id
            )
            if outcome.checkpoint is not None:
                checkpoint = checkpoint_event(outcome.checkpoint, start_s, emitted_at_ms)
                add_to_outbox(
                    conn,
                    keyed(LEDGER_CHECKPOINT, start_s),
                    checkpoint.SerializeToString(),
                    checkpoint.header.event_id,
                )
            booked[(outcome.market_id, start_s, outcome.revision)] = by_code

        outcomes = self.store.settle_due(
            lambda _market_id: self.rules, limit=SETTLE_LIMIT, on_settled=on_settled, on_error=self._refused
        )
        return [Settled(o, booked.get((o.market_id, o.interval_start_s, o.revision), {})) for o in outcomes]

    def _refused(self, market_id: str, interval_start_s: int, error: Exception) -> None:
        key = (market_id, interval_start_s, str(error))
        if key in self._reported:
            return  # it stays pending and is tried every period; say so once
        self._reported.add(key)
        log.error(
            "settlement refused; the interval stays pending",
            extra={"market_id": market_id, "interval_start_s": interval_start_s, "error": str(error)},
        )

    def record(self, settled: list[Settled]) -> None:
        """Metrics and a log line per committed settlement revision."""
        metrics = self.metrics
        for item in settled:
            outcome = item.outcome
            for code, (count, amount_nano) in item.by_code.items():
                metrics.counter("p2pgrid_ledger_transfers_total").labels(kind=code).inc(count)
                metrics.counter("p2pgrid_ledger_settled_amount_nano_total").labels(kind=code).inc(amount_nano)
            if outcome.status is SettlementStatus.SETTLED:
                metrics.counter("p2pgrid_ledger_intervals_settled_total").inc()
            lag_s = self.clock.now_s() - (outcome.interval_start_s + outcome.interval_s)
            metrics.gauge("p2pgrid_ledger_settlement_lag_seconds").set(lag_s)
            metrics.gauge("p2pgrid_ledger_chain_size").set(outcome.tree_size)
            log.info(
                "interval settled",
                extra={
                    "interval_start_s": outcome.interval_start_s,
                    "revision": outcome.revision,
                    "status": outcome.status.value,
                    "transfers": outcome.transfer_count,
                    "tree_size": outcome.tree_size,
                    "estimated_participants": len(outcome.estimated_participants),
                },
            )

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                settled = await loop.run_in_executor(self.writer, self.settle_once)
            except FATAL_ERRORS:
                log.critical("the ledger is broken; stopping", exc_info=True)
                raise
            except Exception:
                log.exception("settlement failed; retrying next period")
                settled = []
            if settled:
                self.on_events()
                self.record(settled)
            if len(settled) < SETTLE_LIMIT:
                await wait_stop(stop, self.period_s)
