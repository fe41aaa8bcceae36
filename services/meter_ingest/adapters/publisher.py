"""Readings to JetStream: ReadingsBatch messages with content-derived dedup ids, many acks in flight.

Readings are published straight to the stream, not through the outbox: they
are the live picture (grid_check's view), not what settlement is computed
from. Settlement uses interval energy, derived from the counters the pipeline
keeps and published exactly once through the outbox (`energy.py`).

Pushed readings are published per pushed message as soon as they are
validated (`PushSession` in `grpc_api.py` keeps several in flight). Polled
readings are gathered by `PollBuffer` and published every `flush_s` or as soon
as a message is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.adapters.convert import readings_messages
from services.platform.metrics import Metrics
from services.platform.nats_bus import NatsBus

log = logging.getLogger(__name__)

STREAM = "METERING"
SOURCE_POLL = "poll"
SOURCE_PUSH = "push"


class ReadingsPublisher:
    """Publishes readings as ReadingsBatch messages of at most `per_message` readings each."""

    def __init__(self, bus: NatsBus, *, producer: str, per_message: int, metrics: Metrics) -> None:
        self.bus = bus
        self.producer = producer
        self.per_message = per_message
        self._published = metrics.counter("p2pgrid_nats_published_total").labels(
            service=metrics.service, stream=STREAM
        )

    async def publish(self, source: str, readings: Sequence[pb.Reading]) -> int:
        """Publish and await every ack; returns how many readings were published."""
        if not readings:
            return 0
        messages = readings_messages(
            source,
            readings,
            producer=self.producer,
            emitted_at_ms=int(time.time() * 1000),
            per_message=self.per_message,
        )
        await self.bus.publish_many(messages)
        self._published.inc(len(messages))
        return len(readings)


class PollBuffer:
    """Gathers polled readings and publishes them in batches; a failed publish is retried with the next one."""

    def __init__(self, publisher: ReadingsPublisher, *, flush_s: float, max_buffered: int = 100_000) -> None:
        self.publisher = publisher
        self.flush_s = flush_s
        self.max_buffered = max_buffered
        self._buffer: list[pb.Reading] = []
        self._full = asyncio.Event()
        self.dropped = 0

    def add(self, reading: pb.Reading) -> None:
        self._buffer.append(reading)
        if len(self._buffer) >= self.publisher.per_message:
            self._full.set()

    async def flush(self) -> None:
        readings, self._buffer = self._buffer, []
        self._full.clear()
        if not readings:
            return
        try:
            await self.publisher.publish(SOURCE_POLL, readings)
        except Exception as exc:
            # Readings feed the live view; energy does not depend on them, so keep a bounded backlog only.
            backlog = readings + self._buffer
            self.dropped += max(0, len(backlog) - self.max_buffered)
            self._buffer = backlog[-self.max_buffered :]
            log.warning("polled readings not published yet (%s); %d waiting", exc, len(self._buffer))
            await asyncio.sleep(min(self.flush_s * 5, 2.0))

    async def run(self, stop: asyncio.Event) -> None:
        """Publish every `flush_s` (or when a message is full) until `stop`, then once more."""
        while not stop.is_set():
            waiters = [asyncio.ensure_future(self._full.wait()), asyncio.ensure_future(stop.wait())]
            _done, pending = await asyncio.wait(
                waiters, timeout=self.flush_s, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            await self.flush()
        await self.flush()
