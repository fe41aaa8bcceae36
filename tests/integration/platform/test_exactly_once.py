"""Outbox and inbox give exactly-once effects across SIGKILLs of the relaying and consuming processes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from services.platform.db import make_engine
from services.platform.nats_server import NatsServer

WORKER = str(Path(__file__).with_name("exactly_once_worker.py"))
TOTAL_EVENTS = 10_000
PRODUCER_KILLS = 5
CONSUMER_KILLS = 3


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_every_committed_event_is_applied_exactly_once_while_the_relay_is_killed_repeatedly(
    database_url: str, nats_server: NatsServer
) -> None:
    rng = random.Random(20261121)
    subprocess.run([sys.executable, WORKER, "setup", database_url, nats_server.url], check=True, timeout=60)
    producer = spawn("produce", database_url, nats_server.url, str(TOTAL_EVENTS))
    consumer = spawn("consume", database_url, nats_server.url)
    engine = make_engine(database_url)

    def count(table: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(text(f"select count(*) from {table}")).scalar_one())

    producer_kills = consumer_kills = 0
    try:
        # Kill the producer (which relays) at random moments while it is mid-way.
        while producer_kills < PRODUCER_KILLS:
            time.sleep(rng.uniform(0.2, 0.9))
            if producer.poll() is not None:
                break
            producer.send_signal(signal.SIGKILL)
            producer.wait()
            producer_kills += 1
            if consumer_kills < CONSUMER_KILLS and rng.random() < 0.7:
                consumer.send_signal(signal.SIGKILL)
                consumer.wait()
                consumer_kills += 1
                consumer = spawn("consume", database_url, nats_server.url)
            producer = spawn("produce", database_url, nats_server.url, str(TOTAL_EVENTS))
        assert producer_kills >= PRODUCER_KILLS, "the producer finished before it could be killed 5 times"
        output = producer.communicate(timeout=300)[0].decode()
        assert producer.returncode == 0, output
        deadline = time.monotonic() + 120
        while count("applied") < TOTAL_EVENTS and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for process in (producer, consumer):
            if process.poll() is None:
                process.kill()
                process.wait()
    with engine.connect() as conn:
        produced = {row[0] for row in conn.execute(text("select event_id from produced"))}
        applied = dict(conn.execute(text("select event_id, times from applied")).all())
        unpublished = conn.execute(
            text("select count(*) from outbox where published_at_s is null")
        ).scalar_one()
    engine.dispose()
    lost = produced - applied.keys()
    twice = {event_id for event_id, times in applied.items() if times != 1}
    phantom = applied.keys() - produced
    assert len(produced) == TOTAL_EVENTS
    assert (len(lost), len(twice), len(phantom), unpublished) == (0, 0, 0, 0), (
        f"lost {sorted(lost)[:5]}, applied twice {sorted(twice)[:5]}, never produced {sorted(phantom)[:5]}"
    )
