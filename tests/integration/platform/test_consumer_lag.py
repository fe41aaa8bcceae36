"""A pull consumer reports how many messages still wait behind each batch: the lag the dashboards show."""

from __future__ import annotations

import asyncio

from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_REQUEST


def test_a_pull_consumer_reports_the_messages_waiting_after_each_batch_and_zero_once_drained(
    nats_server: NatsServer,
) -> None:
    async def scenario() -> list[tuple[str, int]]:
        bus = await NatsBus.connect(nats_server.url, name="lag-test")
        try:
            await bus.ensure_streams()
            items = [(f"{CLEARING_REQUEST}.{start}", b"x", f"request-{start}") for start in range(10)]
            assert await bus.publish_many(items) == 10
            reported: list[tuple[str, int]] = []
            bus.on_pending = lambda durable, waiting: reported.append((durable, waiting))
            stop = asyncio.Event()
            seen = 0
            async for deliveries in bus.pull(
                "CLEARING", "lag-probe", f"{CLEARING_REQUEST}.>", batch=4, fetch_timeout_s=0.2, stop=stop
            ):
                for delivery in deliveries:
                    await delivery.ack()
                seen += len(deliveries)
                if seen == 10:
                    # One more fetch finds nothing: the lag is reported as zero.
                    asyncio.get_running_loop().call_later(0.6, stop.set)
            return reported
        finally:
            await bus.close()

    reported = asyncio.run(scenario())
    assert reported[:3] == [("lag-probe", 6), ("lag-probe", 2), ("lag-probe", 0)]
    assert reported[-1] == ("lag-probe", 0)
