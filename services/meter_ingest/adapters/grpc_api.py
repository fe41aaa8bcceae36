"""The MeterIngest gRPC service: PushReadings, a client stream of ReadingBatch messages from meters and gateways.

Every call carries a call token for audience `p2pgrid.meteringest.v1`
(`services/domain/credentials.py`); only keys listed under some meter's
`push.public_keys` are accepted (UNAUTHENTICATED otherwise). Which meters a
caller may push follows from its key (see `domain/meter_config.py`); other
readings in its messages are rejected and counted, never published.

Each message is validated as it arrives and its accepted readings are
published while the next message is read, with at most `in_flight` messages
awaiting their acks. The summary counts a reading as accepted once its
ReadingsBatch is acknowledged by the stream (flagged readings included: they
are published as invalid), and as rejected when it was refused or dropped as
a duplicate; `errors` says why for the first few. If the stream cannot take
the readings the call ends UNAVAILABLE: readings validated by then already
count for interval energy, and sending them again reports them as duplicates.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from services.domain.errors import DomainError
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2_grpc as pb_grpc
from services.meter_ingest.adapters.ingest import MAX_ERRORS, Ingestor
from services.meter_ingest.adapters.publisher import SOURCE_PUSH, ReadingsPublisher
from services.platform.grpc_server import current_identity

SERVICE_NAME = "p2pgrid.meteringest.v1.MeterIngest"


class StreamUnavailable(DomainError):
    """The readings could not be published; the caller may retry."""

    status = "UNAVAILABLE"


class PushSession:
    """One push stream: validates each message, keeps its publishes in flight, sums up at the end."""

    def __init__(
        self, ingestor: Ingestor, publisher: ReadingsPublisher, participant_id: str, *, in_flight: int
    ) -> None:
        self.ingestor = ingestor
        self.publisher = publisher
        self.participant_id = participant_id
        self.in_flight = in_flight
        self.accepted = 0
        self.rejected = 0
        self.errors: list[str] = []
        self._pending: deque[asyncio.Future[int]] = deque()

    async def take(self, readings: Any) -> None:
        outcome = self.ingestor.accept_pushed(self.participant_id, readings)
        self.rejected += outcome.rejected
        self.errors.extend(outcome.errors[: MAX_ERRORS - len(self.errors)])
        if outcome.readings:
            self._pending.append(asyncio.ensure_future(self.publisher.publish(SOURCE_PUSH, outcome.readings)))
        while len(self._pending) > self.in_flight:
            await self._settle(self._pending.popleft())

    async def finish(self) -> pb.PushSummary:
        while self._pending:
            await self._settle(self._pending.popleft())
        return pb.PushSummary(accepted=self.accepted, rejected=self.rejected, errors=self.errors)

    def abandon(self) -> None:
        """The stream ended early: publishes already started still complete, but nobody awaits them."""
        self._pending.clear()

    async def _settle(self, future: asyncio.Future[int]) -> None:
        try:
            self.accepted += await future
        except Exception as exc:
            for rest in self._pending:
                rest.cancel()
            self._pending.clear()
            raise StreamUnavailable(
                f"readings could not be published to the stream ({type(exc).__name__}); "
                f"{self.accepted} were accepted before, resend the rest"
            ) from None


class MeterIngestServicer(pb_grpc.MeterIngestServicer):
    """PushReadings over the service's meters."""

    def __init__(self, ingestor: Ingestor, publisher: ReadingsPublisher, *, in_flight: int) -> None:
        self.ingestor = ingestor
        self.publisher = publisher
        self.in_flight = in_flight

    async def PushReadings(
        self, request_iterator: AsyncIterator[pb.ReadingBatch], context: Any
    ) -> pb.PushSummary:
        session = PushSession(
            self.ingestor, self.publisher, current_identity().participant_id, in_flight=self.in_flight
        )
        try:
            async for batch in request_iterator:
                await session.take(batch.readings)
        except asyncio.CancelledError:
            session.abandon()
            raise
        return await session.finish()
