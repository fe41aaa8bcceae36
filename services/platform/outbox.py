"""Exactly-once in effect: a transactional outbox for producers and an inbox for consumers.

A producer calls `add_to_outbox(conn, ...)` inside the same database
transaction as its state change, so the event exists if and only if the
change committed. `OutboxRelay` publishes pending events to JetStream with
`Nats-Msg-Id` = event id and marks them published; a crash between publish
and mark only republishes, which the stream's duplicate window and the
consumer's inbox both absorb.

A consumer calls `record_in_inbox(conn, consumer, event_id)` inside the
transaction that applies the event's effect; it returns False for an event
already applied, and the consumer then only acks. `consume_exactly_once`
wires the two with a durable pull consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from services.platform.db import migrate
from services.platform.metrics import Metrics
from services.platform.nats_bus import Delivery, NatsBus
from services.platform.subjects import stream_for

log = logging.getLogger(__name__)

metadata = MetaData()
outbox_table = Table(
    "outbox",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("subject", String(255), nullable=False),
    Column("payload", LargeBinary(), nullable=False),
    Column("headers_json", Text(), nullable=False),
    Column("created_at_s", Float(), nullable=False),
    Column("published_at_s", Float(), nullable=True),
)
inbox_table = Table(
    "inbox",
    metadata,
    Column("consumer", String(128), primary_key=True),
    Column("event_id", String(128), primary_key=True),
    Column("received_at_s", Float(), nullable=False),
)


def migrate_platform_tables(engine: Engine) -> None:
    """Create or upgrade the outbox and inbox tables in a service's database."""
    migrate(engine, "services.platform.migrations", "alembic_version_platform")


def add_to_outbox(
    conn: Connection, subject: str, payload: bytes, event_id: str, headers: dict[str, str] | None = None
) -> None:
    """Write an event in the caller's transaction; it is relayed after the transaction commits."""
    stream_for(subject)  # Fails now, not at relay time, for a subject no stream carries.
    conn.execute(
        outbox_table.insert().values(
            event_id=event_id,
            subject=subject,
            payload=payload,
            headers_json=json.dumps(headers or {}),
            created_at_s=time.time(),
        )
    )


def record_in_inbox(conn: Connection, consumer: str, event_id: str) -> bool:
    """Record that `consumer` applied `event_id`, in the caller's transaction; False if it already had."""
    if not event_id:
        raise ValueError("an event without an id cannot be applied exactly once")
    values = {"consumer": consumer, "event_id": event_id, "received_at_s": time.time()}
    if conn.dialect.name == "postgresql":
        stmt: Any = postgresql.insert(inbox_table).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(inbox_table).values(**values).on_conflict_do_nothing()
    # RETURNING is exact on both databases, where rowcount is not always reported for upserts.
    return conn.execute(stmt.returning(inbox_table.c.event_id)).first() is not None


class OutboxRelay:
    """Publishes committed outbox events to JetStream in commit order, then marks them published."""

    def __init__(
        self,
        engine: Engine,
        bus: NatsBus,
        *,
        metrics: Metrics | None = None,
        batch_size: int = 500,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.metrics = metrics
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Called after a commit that added events, so the relay need not wait for its next poll."""
        self._wake.set()

    def _pending(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        outbox_table.c.seq,
                        outbox_table.c.event_id,
                        outbox_table.c.subject,
                        outbox_table.c.payload,
                    )
                    .where(outbox_table.c.published_at_s.is_(None))
                    .order_by(outbox_table.c.seq)
                    .limit(self.batch_size)
                )
            )

    def _mark(self, seqs: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox_table).where(outbox_table.c.seq.in_(seqs)).values(published_at_s=time.time())
            )

    def pending_count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(outbox_table)
                    .where(outbox_table.c.published_at_s.is_(None))
                ).scalar_one()
            )

    async def relay_once(self) -> int:
        """Publish one batch of pending events; returns how many were relayed."""
        rows = await asyncio.to_thread(self._pending)
        if not rows:
            return 0
        await self.bus.publish_many([(row.subject, bytes(row.payload), row.event_id) for row in rows])
        await asyncio.to_thread(self._mark, [row.seq for row in rows])
        if self.metrics is not None:
            counter = self.metrics.counter("p2pgrid_nats_published_total")
            for row in rows:
                counter.labels(service=self.metrics.service, stream=stream_for(row.subject).name).inc()
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set, then relay what is left once more."""
        while not stop.is_set():
            try:
                relayed = await self.relay_once()
            except Exception:
                log.exception("outbox relay failed; retrying")
                relayed = 0
                await asyncio.sleep(0.5)
            if relayed == 0:
                self._wake.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                _done, pending = await asyncio.wait(
                    waiters, timeout=self.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in pending:
                    waiter.cancel()
        try:
            while await self.relay_once():
                pass
        except Exception:
            log.exception("final outbox relay failed; events stay pending for the next start")


Apply = Callable[[Connection, Delivery], None]


async def consume_exactly_once(
    bus: NatsBus,
    engine: Engine,
    *,
    stream: str,
    durable: str,
    filter_subject: str,
    apply: Apply,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
    batch: int = 256,
    after_commit: Callable[[list[Delivery]], None] | None = None,
) -> None:
    """Apply each delivered event at most once in effect: inbox row and effect in one transaction, then ack.

    Events already in the inbox are acked without effect. A failure in `apply`
    rolls back the whole batch; the messages are redelivered after ack_wait.
    """

    def _apply_batch(deliveries: list[Delivery]) -> list[bool]:
        outcomes = []
        with engine.begin() as conn:
            for delivery in deliveries:
                fresh = record_in_inbox(conn, durable, delivery.event_id)
                if fresh:
                    apply(conn, delivery)
                outcomes.append(fresh)
        return outcomes

    async for deliveries in bus.pull(stream, durable, filter_subject, batch=batch, stop=stop):
        outcomes = await asyncio.to_thread(_apply_batch, deliveries)
        if after_commit is not None:
            after_commit([d for d, fresh in zip(deliveries, outcomes, strict=True) if fresh])
        for delivery in deliveries:
            await delivery.ack()
        if metrics is not None:
            counter = metrics.counter("p2pgrid_nats_consumed_total")
            for fresh in outcomes:
                counter.labels(
                    service=metrics.service, stream=stream, outcome="applied" if fresh else "duplicate"
                ).inc()
