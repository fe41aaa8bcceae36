"""grid_check on NATS: answers the matcher's limit requests and re-checks every clearing result exactly once.

Limit requests are core request-reply on `p2pgrid.grid.limits` (and keyed
subjects under it): the request is an events `LimitRequest`, the reply a
gridcheck `Limits` for that interval.

Clearing results come from the CLEARING stream through a durable consumer;
each is applied exactly once (inbox) and its verdict goes out through the
outbox as `GridVerdict` with event id `grid-verdict-<interval_start_s>`, in
the same transaction. A failing verdict is an alarm: the matcher published
flows the grid cannot carry, so it is logged as an error and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from google.protobuf.message import DecodeError
from sqlalchemy import Connection, Engine, select

from services.gen.p2pgrid.events.v1 import events_pb2
from services.grid_check.adapters.convert import (
    clearing_from_proto,
    limits_to_proto,
    violation_to_proto,
)
from services.grid_check.adapters.limit_store import LimitBook
from services.grid_check.domain.checks import Verdict, recheck_clearing
from services.grid_check.domain.network import FlowModel
from services.platform.metrics import Metrics
from services.platform.nats_bus import Delivery, NatsBus
from services.platform.outbox import OutboxRelay, add_to_outbox, consume_exactly_once, outbox_table
from services.platform.subjects import CLEARING_RESULT, GRID_LIMITS_REQUEST, GRID_VERDICT, keyed

log = logging.getLogger(__name__)

CLEARING_STREAM = "CLEARING"
OUTCOME_PASS = "pass"
OUTCOME_FAIL = "fail"
OUTCOME_UNREADABLE = "unreadable"
SOURCE_CLEARING = "clearing"


def verdict_event_id(interval_start_s: int) -> str:
    return f"grid-verdict-{interval_start_s}"


class LimitResponder:
    """Answers limit requests from the limits in force (memory only: no database on this path)."""

    def __init__(self, bus: NatsBus, book: LimitBook, *, queue: str) -> None:
        self.bus = bus
        self.book = book
        self.queue = queue

    async def answer(self, data: bytes) -> bytes:
        request = events_pb2.LimitRequest.FromString(data)
        limits = self.book.limits_for(request.interval_start_s)
        return limits_to_proto(request.interval_start_s, limits).SerializeToString()

    async def start(self) -> None:
        # A queue group, so that of several grid_check processes exactly one answers each request.
        await self.bus.serve(GRID_LIMITS_REQUEST, self.answer, queue=self.queue)
        await self.bus.serve(f"{GRID_LIMITS_REQUEST}.>", self.answer, queue=self.queue)


class VerdictPublisher:
    """Re-checks each clearing result against the limits of its interval and publishes the verdict."""

    def __init__(
        self,
        *,
        bus: NatsBus,
        engine: Engine,
        model: FlowModel,
        book: LimitBook,
        metrics: Metrics,
        relay: OutboxRelay,
        durable: str,
        producer: str,
        default_interval_s: int,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.model = model
        self.book = book
        self.metrics = metrics
        self.relay = relay
        self.durable = durable
        self.producer = producer
        self.default_interval_s = default_interval_s
        # Verdicts of the batch being applied, counted once its transaction has committed.
        self._applied: dict[str, Verdict | None] = {}
        self._verdicts = metrics.counter("p2pgrid_grid_verdicts_total")
        self._violations = metrics.counter("p2pgrid_grid_violations_total")

    def apply(self, conn: Connection, delivery: Delivery) -> None:
        """Inside the inbox transaction: judge the result and put its verdict in the outbox."""
        try:
            event = events_pb2.ClearingResultEvent.FromString(delivery.data)
        except DecodeError:
            log.error(
                "unreadable clearing result: no verdict can be given",
                extra={"subject": delivery.subject, "event_id": delivery.event_id},
            )
            self._applied[delivery.event_id] = None
            return
        clearing = clearing_from_proto(event.result, default_interval_s=self.default_interval_s)
        limits = self.book.limits_for(clearing.interval_start_s)
        verdict = recheck_clearing(self.model, limits, clearing)
        event_id = verdict_event_id(verdict.interval_start_s)
        if conn.execute(select(outbox_table.c.seq).where(outbox_table.c.event_id == event_id)).first():
            # A second, different result for an interval already judged: judge it too, under its own id.
            suffix = hashlib.sha256(delivery.event_id.encode()).hexdigest()[:16]
            log.warning(
                "a second clearing result for interval %s (event %s)",
                verdict.interval_start_s,
                delivery.event_id,
            )
            event_id = f"{event_id}-{suffix}"
        message = events_pb2.GridVerdict(
            header=events_pb2.EventHeader(
                event_id=event_id, emitted_at_ms=int(time.time() * 1000), producer=self.producer
            ),
            interval_start_s=verdict.interval_start_s,
            ok=verdict.ok,
            violations=[violation_to_proto(v) for v in verdict.violations],
        )
        add_to_outbox(
            conn, keyed(GRID_VERDICT, verdict.interval_start_s), message.SerializeToString(), event_id
        )
        self._applied[delivery.event_id] = verdict

    def after_commit(self, deliveries: list[Delivery]) -> None:
        """Count and report what the committed batch decided, then wake the relay."""
        for delivery in deliveries:
            verdict = self._applied.get(delivery.event_id)
            if verdict is None:
                self._verdicts.labels(outcome=OUTCOME_UNREADABLE).inc()
                continue
            self._verdicts.labels(outcome=OUTCOME_PASS if verdict.ok else OUTCOME_FAIL).inc()
            for violation in verdict.violations:
                self._violations.labels(line=violation.line_id or "-", source=SOURCE_CLEARING).inc()
            if verdict.ok:
                log.info("clearing result passes", extra={"interval_start_s": verdict.interval_start_s})
            else:
                log.error(
                    "clearing result FAILS the grid check: %s",
                    "; ".join(v.message for v in verdict.violations),
                    extra={"interval_start_s": verdict.interval_start_s},
                )
        self._applied.clear()
        if deliveries:
            self.relay.notify()

    async def run(self, stop: asyncio.Event) -> None:
        await consume_exactly_once(
            self.bus,
            self.engine,
            stream=CLEARING_STREAM,
            durable=self.durable,
            filter_subject=f"{CLEARING_RESULT}.>",
            apply=self.apply,
            stop=stop,
            metrics=self.metrics,
            after_commit=self.after_commit,
        )
