"""A producer or a consumer process for the exactly-once test; the test SIGKILLs it at random moments.

produce: writes `total` events, each in the same transaction as a row in
`produced`, to the outbox in random-sized batches, relaying them to
JetStream concurrently; after a restart it continues from what committed.
consume: applies events through the inbox, counting applications per event
in `applied`, so an event applied twice shows as a count of 2.
"""

from __future__ import annotations

import asyncio
import random
import sys

from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from services.platform.db import make_engine
from services.platform.nats_bus import Delivery, NatsBus
from services.platform.outbox import OutboxRelay, add_to_outbox, consume_exactly_once, migrate_platform_tables
from services.platform.subjects import PLATFORM_TEST, keyed

metadata = MetaData()
produced = Table("produced", metadata, Column("event_id", String(64), primary_key=True))
applied = Table(
    "applied",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("times", Integer, nullable=False),
)


async def produce(url: str, nats_url: str, total: int) -> None:
    engine = make_engine(url)
    bus = await NatsBus.connect(nats_url, name="producer")
    await bus.ensure_streams()
    relay = OutboxRelay(engine, bus, batch_size=200, poll_interval_s=0.01)
    stop = asyncio.Event()
    relay_task = asyncio.create_task(relay.run(stop))

    def write_batch() -> int:
        with engine.begin() as conn:
            done = int(conn.execute(select(func.count()).select_from(produced)).scalar_one())
            size = min(random.randint(1, 60), total - done)
            for i in range(done, done + size):
                event_id = f"ev-{i:06d}"
                conn.execute(produced.insert().values(event_id=event_id))
                add_to_outbox(conn, keyed(PLATFORM_TEST, "eo"), event_id.encode(), event_id)
            return done + size

    while True:
        done = await asyncio.to_thread(write_batch)
        relay.notify()
        if done >= total:
            break
        await asyncio.sleep(0)
    while relay.pending_count():
        await asyncio.sleep(0.05)
    stop.set()
    await relay_task
    await bus.close()
    print("produced", total, flush=True)


async def consume(url: str, nats_url: str) -> None:
    engine = make_engine(url)
    bus = await NatsBus.connect(nats_url, name="consumer")
    await bus.ensure_streams()

    def apply(conn: Connection, delivery: Delivery) -> None:
        event_id = delivery.data.decode()
        values = {"event_id": event_id, "times": 1}
        if conn.dialect.name == "postgresql":
            stmt = postgresql.insert(applied).values(**values)
        else:
            stmt = sqlite.insert(applied).values(**values)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["event_id"], set_={"times": applied.c.times + 1})
        )

    stop = asyncio.Event()
    await consume_exactly_once(
        bus,
        engine,
        stream="PLATFORM",
        durable="exactly-once-test",
        filter_subject=f"{PLATFORM_TEST}.>",
        apply=apply,
        stop=stop,
        batch=100,
    )


def setup(url: str) -> None:
    engine = make_engine(url)
    migrate_platform_tables(engine)
    metadata.create_all(engine)
    engine.dispose()


if __name__ == "__main__":
    mode, database_url, nats_url = sys.argv[1:4]
    if mode == "setup":
        setup(database_url)
    elif mode == "produce":
        asyncio.run(produce(database_url, nats_url, int(sys.argv[4])))
    elif mode == "consume":
        asyncio.run(consume(database_url, nats_url))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
