"""The ledger service settles an interval exactly once although its events arrive three times and it is killed between commit and ack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ledger_service_testing import (
    AFTER_DEADLINE_S,
    BEFORE_DEADLINE_S,
    ENERGY_BATCHES,
    INTERVAL_START_S,
    RULES,
    LedgerProcess,
    Published,
    consumers_pending,
    expected_inputs,
    interval_events,
    publish,
    stream_messages,
    wait_until,
)
from ledger_testing import LATE_CLOCK, LEDGER_KEY
from sqlalchemy import select

from services.gen.p2pgrid.events.v1 import events_pb2
from services.ledger.adapters.consumers import FAULT_LOG_MESSAGE
from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.platform.db import make_engine
from services.platform.nats_server import NatsServer
from services.platform.outbox import inbox_table

KILLS = 20


def clean_settlement(workdir: Path) -> tuple[dict[str, int], set[str]]:
    """Balances and transfer ids of one settlement of the same inputs on a fresh store."""
    engine = make_engine(f"sqlite:///{workdir / 'clean.db'}")
    try:
        migrate_ledger(engine)
        store = LedgerStore(engine, LEDGER_KEY, clock=LATE_CLOCK)
        store.settle_interval(expected_inputs(ENERGY_BATCHES), RULES)
        balances = {a: b.balance_nano for a, b in store.balances().items()}
        return balances, {s.transfer.transfer_id for s in store.transfers_of_interval(INTERVAL_START_S)}
    finally:
        engine.dispose()


@pytest.mark.slow
def test_events_delivered_three_times_with_twenty_kills_between_commit_and_ack_settle_exactly_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """How the commit-to-ack window is hit: the service runs with `--fault-pause-after-commit-s 30`,
    which makes each consumer log 'fault injection: committed, not acked' after its transaction
    commits and then wait 30 s before acking. The test SIGKILLs the process as soon as it reads that
    line, so every kill falls after a commit and before that batch's ack, and JetStream redelivers
    the batch to the next process (ack wait 1 s).

    Three deliveries: the stream's duplicate window drops a repeat of a Nats-Msg-Id, so the second
    and third copies of each event are published under transport ids of their own with the same
    bytes, as a producer republishing after the window would; the ledger must know them by the event
    id inside the message.

    Deadline: while it is killed the service's simulated clock stands before the interval's metering
    deadline, so nothing is due; then it is restarted with the clock past the deadline and settles.
    The result is compared with one clean settlement of the same inputs on a fresh store.
    """
    events = interval_events()
    copies = [Published(e.subject, e.payload, f"{e.msg_id}/copy-{n}") for n in (2, 3) for e in events]
    publish(nats_server.url, [*events, *copies])
    assert len(stream_messages(nats_server.url, "CLEARING", "p2pgrid.clearing.result.>")) == 3
    assert len(stream_messages(nats_server.url, "METERING", "p2pgrid.metering.energy.>")) == 6

    ledger = LedgerProcess(nats_server.url, tmp_path)
    fault_lines: list[dict[str, Any]] = []
    try:
        while len(fault_lines) < KILLS:
            mark = len(ledger.lines)
            ledger.start(
                "--sim-start-s", str(BEFORE_DEADLINE_S), "--fault-pause-after-commit-s", "30",
                "--consumer-batch", "4", wait_ready=False,
            )  # fmt: skip
            fault_lines.append(ledger.wait_for_log(FAULT_LOG_MESSAGE, after=mark))
            ledger.kill()
        killed_lines = list(ledger.lines)
        assert not any(line.get("msg") == "interval settled" for line in killed_lines)

        ledger.start("--sim-start-s", str(AFTER_DEADLINE_S))
        wait_until(lambda: ledger.logged("interval settled"), what="the settlement")
        wait_until(lambda: consumers_pending(nats_server.url) == 0, what="every event acked")
        wait_until(
            lambda: len(stream_messages(nats_server.url, "LEDGER", "p2pgrid.ledger.>")) >= 2,
            what="the settlement's events",
        )
        assert ledger.stop() == 0
        # Another key than the one that signed the checkpoints: the service refuses to start.
        ledger.start("--signing-key-file", str(tmp_path / "other.key"), wait_ready=False)
        assert ledger.wait_exit() == 2
        assert "--signing-key-file" in ledger.log_tail(3) and "signed by" in ledger.log_tail(3)
    finally:
        ledger.close()

    # The first commit of all was a fresh one and was killed before its ack; later kills mostly hit
    # batches of events applied already (redeliveries and copies), which the inbox turned into acks only.
    assert fault_lines[0]["applied"]
    committed = ledger.logged(FAULT_LOG_MESSAGE)  # a process may have committed in both consumers
    applied = [event_id for line in committed for event_id in line["applied"]]
    applied += [event_id for line in ledger.logged("events applied") for event_id in line["event_ids"]]
    assert len(applied) == len(set(applied))
    assert sum(len(line["duplicates"]) for line in committed) >= KILLS - len(events)

    engine = make_engine(ledger.database_url)
    try:
        store = LedgerStore(engine)
        balances = {a: b.balance_nano for a, b in store.balances().items()}
        transfer_ids = {s.transfer.transfer_id for s in store.transfers_of_interval(INTERVAL_START_S)}
        revisions = store.settled_revisions("default", INTERVAL_START_S)
        with engine.connect() as conn:
            inbox = conn.execute(select(inbox_table.c.consumer, inbox_table.c.event_id)).all()
    finally:
        engine.dispose()
    clean_balances, clean_ids = clean_settlement(tmp_path)
    assert balances == clean_balances
    assert transfer_ids == clean_ids
    assert len(revisions) == 1 and revisions[0].transfer_count == len(clean_ids)
    assert sorted(tuple(row) for row in inbox) == sorted(
        ("ledger-clearing-results" if e.msg_id.startswith("clearing") else "ledger-interval-energy", e.msg_id)
        for e in events
    )

    announced = stream_messages(nats_server.url, "LEDGER", "p2pgrid.ledger.>")
    assert sorted(msg_id for _subject, _data, msg_id in announced) == [
        f"ledger-checkpoint-{len(clean_ids)}",
        f"ledger-settled-{INTERVAL_START_S}-r0",
    ]
    settled = next(
        events_pb2.IntervalSettled.FromString(data)
        for subject, data, _id in announced
        if ".settled." in subject
    )
    assert settled.transfers == len(clean_ids)

    verify = subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", "verify", "--database-url", ledger.database_url,
         "--quiet", "--key", str(ledger.key_file) + ".pub"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"OK: {len(clean_ids)} transfers")
