"""The NATS adapter every service uses: connect, declare streams, publish with dedup ids, consume with explicit acks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from services.platform.subjects import STREAMS, StreamSpec

log = logging.getLogger(__name__)


class NatsConnectError(ConnectionError):
    """NATS could not be reached."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from a durable consumer; ack it once its effect is committed."""

    subject: str
    data: bytes
    event_id: str
    num_delivered: int
    msg: Msg

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay_s: float | None = None) -> None:
        await self.msg.nak(delay=delay_s)


class NatsBus:
    """A connected NATS client with its JetStream context."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.js: JetStreamContext = client.jetstream()
        self.name = name
        # Told (durable, messages still waiting after the batch just fetched) after every fetch of `pull`:
        # the consumer's lag, for the p2pgrid_nats_consumer_pending gauge.
        self.on_pending: Callable[[str, int], None] | None = None

    @classmethod
    async def connect(cls, url: str, *, name: str, timeout_s: float = 3.0) -> NatsBus:
        """Connect, failing fast with NatsConnectError if no server answers in time."""
        servers = [part.strip() for part in url.split(",")]

        async def _quiet(_exc: Exception) -> None:
            return None

        try:
            client = await asyncio.wait_for(
                nats.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=_quiet,
                ),
                timeout=timeout_s * 2,
            )
        except (NoServersError, OSError, TimeoutError, NatsTimeoutError):
            raise NatsConnectError(
                f"cannot connect to {url}: no NATS server answered within {timeout_s:g} s"
            ) from None
        return cls(client, name)

    async def ensure_streams(self, specs: Sequence[StreamSpec] = STREAMS, *, replicas: int = 1) -> None:
        """Create or update every stream (idempotent); all services call this at start.

        `replicas` is 1 on a single server and 3 in a clustered deployment, so
        that each stream survives the loss of a server.
        """
        for spec in specs:
            config = StreamConfig(
                name=spec.name,
                description=spec.description,
                subjects=list(spec.subjects),
                storage=StorageType.FILE,
                duplicate_window=spec.duplicate_window_s,
                max_age=spec.max_age_s,
                num_replicas=replicas,
            )
            try:
                await self.js.stream_info(spec.name)
                await self.js.update_stream(config)
            except NotFoundError:
                await self.js.add_stream(config)

    async def publish(self, subject: str, payload: bytes, *, event_id: str, timeout_s: float = 5.0) -> bool:
        """Publish to JetStream with `Nats-Msg-Id` = event_id and await the ack; True if it was new."""
        ack = await self.js.publish(subject, payload, timeout=timeout_s, headers={"Nats-Msg-Id": event_id})
        return not ack.duplicate

    async def publish_many(self, items: Sequence[tuple[str, bytes, str]], *, timeout_s: float = 10.0) -> int:
        """Publish (subject, payload, event_id) items with many acks in flight; returns how many were new."""
        futures = [
            await self.js.publish_async(subject, payload, headers={"Nats-Msg-Id": event_id})
            for subject, payload, event_id in items
        ]
        acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=timeout_s)
        return sum(0 if ack.duplicate else 1 for ack in acks)

    async def pull(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        batch: int = 256,
        ack_wait_s: float = 30.0,
        fetch_timeout_s: float = 1.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[list[Delivery]]:
        """Yield batches from a durable pull consumer with explicit acks, until `stop` is set."""
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=filter_subject,
            max_ack_pending=max(batch * 4, 1024),
        )
        subscription = await self.js.pull_subscribe(
            filter_subject, durable=durable, stream=stream, config=config
        )
        try:
            while stop is None or not stop.is_set():
                try:
                    msgs = await subscription.fetch(batch, timeout=fetch_timeout_s)
                except (NatsTimeoutError, TimeoutError):
                    if self.on_pending is not None:
                        self.on_pending(durable, 0)
                    continue
                if self.on_pending is not None and msgs:
                    self.on_pending(durable, int(msgs[-1].metadata.num_pending or 0))
                deliveries = []
                for msg in msgs:
                    headers = msg.headers or {}
                    event_id = headers.get("Nats-Msg-Id", "")
                    deliveries.append(
                        Delivery(msg.subject, msg.data, event_id, msg.metadata.num_delivered or 1, msg)
                    )
                if deliveries:
                    yield deliveries
        finally:
            await subscription.unsubscribe()

    async def consumer_pending(self, stream: str, durable: str) -> int:
        info = await self.js.consumer_info(stream, durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def request(self, subject: str, payload: bytes, timeout_s: float = 2.0) -> bytes:
        reply = await self.client.request(subject, payload, timeout=timeout_s)
        return bytes(reply.data)

    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]], queue: str = "") -> Any:
        """Answer core-NATS requests on `subject` with `handler`."""

        async def _on_message(msg: Msg) -> None:
            try:
                reply = await handler(msg.data)
            except Exception:
                log.exception("request handler failed", extra={"subject": subject})
                return
            await msg.respond(reply)

        return await self.client.subscribe(subject, queue=queue, cb=_on_message)

    async def close(self) -> None:
        """Drain: finish in-flight messages and acks, then close."""
        if self.client.is_closed:
            return
        try:
            await asyncio.wait_for(self.client.drain(), timeout=5)
        except (TimeoutError, Exception):
            await self.client.close()
