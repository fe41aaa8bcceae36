"""The ledger's JetStream consumers: clearing results and interval energy, each applied exactly once.

Each batch of deliveries is applied in one database transaction: per event,
its inbox row and its effect (staging the clearing result or the meter
energy) in a savepoint, then the transaction commits, then the deliveries are
acked. A crash between commit and ack only makes JetStream redeliver the
batch, and the inbox turns every redelivery into a no-op. The inbox key is the
event id inside the message (its header), which is also its Nats-Msg-Id, so a
copy published again after the stream's duplicate window is recognised too.

An event that can never apply (unreadable, or contradicting what is held:
another clearing result for the interval, another measurement of a meter) is
logged and acked: retrying it would change nothing and block the stream.
BalanceInvariantError and LedgerCorruptError end the consumer, which stops
the service; any other failure (e.g. the database is unreachable) is logged
and the batch is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import Connection

from services.domain.errors import InvariantViolation
from services.ledger.adapters.events import (
    ClearingEvent,
    EnergyEvent,
    EventError,
    clearing_event,
    energy_event,
)
from services.ledger.adapters.sql import LedgerCorruptError, LedgerStore
from services.ledger.domain.ledger import BalanceInvariantError
from services.ledger.domain.settlement import SettlementConflictError, SettlementInputError
from services.platform.metrics import Metrics
from services.platform.nats_bus import Delivery, NatsBus
from services.platform.outbox import record_in_inbox
from services.platform.subjects import CLEARING_RESULT, INTERVAL_ENERGY

log = logging.getLogger(__name__)

FATAL_ERRORS: tuple[type[BaseException], ...] = (
    BalanceInvariantError,
    LedgerCorruptError,
    InvariantViolation,
)
"""Errors after which the ledger must not write another row: the service stops, loudly."""

POISON_ERRORS: tuple[type[Exception], ...] = (EventError, SettlementInputError, SettlementConflictError)
"""Errors of one event that a retry cannot fix: the event is logged and acked."""

FAULT_LOG_MESSAGE = "fault injection: committed, not acked"

E = TypeVar("E", ClearingEvent, EnergyEvent)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    applied: tuple[str, ...]
    duplicates: tuple[str, ...]
    poisoned: int


async def wait_stop(stop: asyncio.Event, timeout_s: float) -> None:
    """Wait until `stop` is set or `timeout_s` has passed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=timeout_s)


class EventConsumer(Generic[E]):
    """One durable pull consumer whose events are applied exactly once through the inbox."""

    def __init__(
        self,
        *,
        bus: NatsBus,
        store: LedgerStore,
        writer: Executor,
        stream: str,
        filter_subject: str,
        durable: str,
        decode: Callable[[bytes], E],
        apply: Callable[[Connection, E], None],
        metrics: Metrics,
        batch: int,
        ack_wait_s: float,
        fault_pause_after_commit_s: float = 0.0,
    ) -> None:
        self.bus = bus
        self.store = store
        self.writer = writer
        self.stream = stream
        self.filter_subject = filter_subject
        self.durable = durable
        self.decode: Callable[[bytes], E] = decode
        self.apply: Callable[[Connection, E], None] = apply
        self.metrics = metrics
        self.batch = batch
        self.ack_wait_s = ack_wait_s
        self.fault_pause_after_commit_s = fault_pause_after_commit_s
        self._consumed = metrics.counter("p2pgrid_nats_consumed_total")

    def apply_batch(self, deliveries: list[Delivery]) -> BatchOutcome:
        """Inbox rows and effects of a batch in one transaction (run on the ledger's writer thread)."""
        applied: list[str] = []
        duplicates: list[str] = []
        poisoned = 0
        with self.store.transaction() as conn:
            for delivery in deliveries:
                try:
                    event = self.decode(delivery.data)
                except EventError as exc:
                    self._poison(delivery, delivery.event_id, exc)
                    poisoned += 1
                    continue
                event_id = event.event_id or delivery.event_id
                if not event_id:
                    self._poison(
                        delivery, "", EventError("header.event_id: is required (and no Nats-Msg-Id)")
                    )
                    poisoned += 1
                    continue
                savepoint = conn.begin_nested()
                try:
                    if record_in_inbox(conn, self.durable, event_id):
                        self.apply(conn, event)
                        applied.append(event_id)
                    else:
                        duplicates.append(event_id)
                except POISON_ERRORS as exc:
                    savepoint.rollback()
                    self._poison(delivery, event_id, exc)
                    poisoned += 1
                    continue
                except BaseException:
                    savepoint.rollback()
                    raise
                savepoint.commit()
        return BatchOutcome(tuple(applied), tuple(duplicates), poisoned)

    def _poison(self, delivery: Delivery, event_id: str, exc: Exception) -> None:
        log.error(
            "event refused, acked without effect",
            extra={
                "consumer": self.durable,
                "subject": delivery.subject,
                "event_id": event_id,
                "error": str(exc),
            },
        )

    async def _consume(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        async for deliveries in self.bus.pull(
            self.stream,
            self.durable,
            self.filter_subject,
            batch=self.batch,
            ack_wait_s=self.ack_wait_s,
            stop=stop,
        ):
            outcome = await loop.run_in_executor(self.writer, self.apply_batch, deliveries)
            if self.fault_pause_after_commit_s > 0:
                log.warning(
                    FAULT_LOG_MESSAGE,
                    extra={
                        "consumer": self.durable,
                        "applied": list(outcome.applied),
                        "duplicates": list(outcome.duplicates),
                        "poisoned": outcome.poisoned,
                    },
                )
                await asyncio.sleep(self.fault_pause_after_commit_s)
            for delivery in deliveries:
                await delivery.ack()
            service = self.metrics.service
            for label, count in (
                ("applied", len(outcome.applied)),
                ("duplicate", len(outcome.duplicates)),
                ("refused", outcome.poisoned),
            ):
                if count:
                    self._consumed.labels(service=service, stream=self.stream, outcome=label).inc(count)
            if outcome.applied:
                log.info(
                    "events applied", extra={"consumer": self.durable, "event_ids": list(outcome.applied)}
                )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; a fatal ledger error propagates (and stops the service), others are retried."""
        while not stop.is_set():
            try:
                await self._consume(stop)
            except FATAL_ERRORS:
                log.critical(
                    "the ledger is broken; stopping", extra={"consumer": self.durable}, exc_info=True
                )
                raise
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consuming failed; retrying", extra={"consumer": self.durable})
                await wait_stop(stop, 1.0)


def clearing_consumer(
    *,
    service: str,
    bus: NatsBus,
    store: LedgerStore,
    writer: Executor,
    market_id: str,
    metrics: Metrics,
    batch: int,
    ack_wait_s: float,
    fault_pause_after_commit_s: float = 0.0,
) -> EventConsumer[ClearingEvent]:
    """Clearing results → `stage_clearing`: held until the interval's metering deadline."""

    def apply(conn: Connection, event: ClearingEvent) -> None:
        if event.self_trades_left_out:
            log.info(
                "trades of a participant with itself at one node left out",
                extra={
                    "interval_start_s": event.clearing.interval_start_s,
                    "trades": event.self_trades_left_out,
                },
            )
        store.stage_clearing(event.clearing, connection=conn)

    return EventConsumer(
        bus=bus,
        store=store,
        writer=writer,
        stream="CLEARING",
        filter_subject=f"{CLEARING_RESULT}.>",
        durable=f"{service}-clearing-results",
        decode=lambda data: clearing_event(data, market_id),
        apply=apply,
        metrics=metrics,
        batch=batch,
        ack_wait_s=ack_wait_s,
        fault_pause_after_commit_s=fault_pause_after_commit_s,
    )


def energy_consumer(
    *,
    service: str,
    bus: NatsBus,
    store: LedgerStore,
    writer: Executor,
    market_id: str,
    metrics: Metrics,
    batch: int,
    ack_wait_s: float,
    fault_pause_after_commit_s: float = 0.0,
) -> EventConsumer[EnergyEvent]:
    """Interval energy (any number of batches per interval) → `stage_meter_readings`, meter by meter."""

    def apply(conn: Connection, event: EnergyEvent) -> None:
        if event.readings:
            store.stage_meter_readings(market_id, event.interval_start_s, event.readings, connection=conn)

    return EventConsumer(
        bus=bus,
        store=store,
        writer=writer,
        stream="METERING",
        filter_subject=f"{INTERVAL_ENERGY}.>",
        durable=f"{service}-interval-energy",
        decode=energy_event,
        apply=apply,
        metrics=metrics,
        batch=batch,
        ack_wait_s=ack_wait_s,
        fault_pause_after_commit_s=fault_pause_after_commit_s,
    )
