"""The ledger service end to end: events over NATS in, settlement, gRPC reads with authorization, receipts and verification out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ledger_service_testing import (
    AFTER_DEADLINE_S,
    ENERGY_BATCHES,
    INTERVAL_START_S,
    KEYS,
    LATE_BATCH,
    RULES,
    TRADES,
    LedgerProcess,
    Metadata,
    Published,
    account,
    clearing_event,
    consumers_pending,
    energy_event,
    expected_inputs,
    interval_events,
    publish,
    stream_messages,
    stub,
    token,
    wait_until,
)
from ledger_testing import LATE_CLOCK, LEDGER_KEY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from services.domain.credentials import make_token
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.ledger.v1 import ledger_pb2 as pb
from services.ledger.adapters.keys import parse_public_key
from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.ledger.domain.checkpoint import Checkpoint, verify_checkpoint_consistency
from services.ledger.domain.ledger import FLAG_CORRECTION, FLAG_ESTIMATED
from services.platform.db import make_engine
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_RESULT, INTERVAL_ENERGY, keyed


@dataclass
class Settled:
    ledger: LedgerProcess
    nats_url: str
    workdir: Path
    public_key: bytes


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settled]:
    """One ledger service that settled the test interval from NATS: first with carol's meter
    interpolated (revision 0), then corrected by her measured data (revision 1)."""
    workdir = tmp_path_factory.mktemp("ledger-service")
    with NatsServer(store_dir=workdir / "nats") as server:
        ledger = LedgerProcess(server.url, workdir)
        try:
            ledger.start("--sim-start-s", str(AFTER_DEADLINE_S))
            clearing, *energy = interval_events()
            publish(
                server.url, energy
            )  # both batches are held before the clearing result makes the interval due
            wait_until(lambda: consumers_pending(server.url) == 0, what="the meter energy held")
            publish(server.url, [clearing])
            wait_until(lambda: len(ledger.logged("interval settled")) == 1, what="the settlement")
            late = Published(
                keyed(INTERVAL_ENERGY, INTERVAL_START_S),
                energy_event(2, LATE_BATCH),
                f"interval-energy-{INTERVAL_START_S}-2",
            )
            publish(server.url, [late])
            wait_until(lambda: len(ledger.logged("interval settled")) == 2, what="the correction")
            public_key = parse_public_key(str(ledger.key_file) + ".pub")
            yield Settled(ledger, server.url, workdir, public_key)
            assert ledger.stop() == 0, ledger.log_tail()
        finally:
            ledger.close()


def expected_balances(
    workdir: Path,
    batches: tuple[tuple[tuple[str, str, int, int, int], ...], ...] = (*ENERGY_BATCHES, LATE_BATCH),
) -> dict[str, int]:
    """One clean settlement, by the store, of all the meter data the service received."""
    engine = make_engine(f"sqlite:///{workdir / 'expected.db'}")
    try:
        migrate_ledger(engine)
        store = LedgerStore(engine, LEDGER_KEY, clock=LATE_CLOCK)
        store.settle_interval(expected_inputs(batches), RULES)
        return {a: b.balance_nano for a, b in store.balances().items()}
    finally:
        engine.dispose()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_an_interval_published_over_nats_settles_to_the_balances_the_store_computes(settled: Settled) -> None:
    expected = expected_balances(settled.workdir)
    assert expected[account("carol")] < 0 and expected["market:default"] == 0
    with settled.ledger.channel() as channel:
        ledger = stub(channel)
        for account_id, balance_nano in expected.items():
            balance = ledger.GetBalance(
                pb.GetBalanceRequest(account_id=account_id), metadata=token("operator")
            )
            assert (balance.account_id, balance.balance_nano) == (account_id, balance_nano)
        for name in ("alice", "bob", "carol", "dave"):
            own = ledger.GetBalance(pb.GetBalanceRequest(), metadata=token(name))
            assert (own.account_id, own.balance_nano) == (account(name), expected[account(name)])
        statement = ledger.GetStatement(pb.GetStatementRequest(), metadata=token("carol"))
        checkpoints = ledger.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=token("carol")).checkpoints
    # Carol's interpolated meter was settled as an estimate, then corrected by her measured data.
    flags = [t.flags for t in statement.transfers if t.kind == "deviation"]
    assert flags == [FLAG_ESTIMATED, FLAG_CORRECTION]
    assert (
        sum(
            t.amount_nano if t.credit_account_id == account("carol") else -t.amount_nano
            for t in statement.transfers
        )
        == statement.balance_nano
    )

    announced = stream_messages(settled.nats_url, "LEDGER", "p2pgrid.ledger.>")
    settled_events = sorted(
        (
            events_pb2.IntervalSettled.FromString(data)
            for subject, data, _id in announced
            if ".settled." in subject
        ),
        key=lambda e: e.header.event_id,
    )
    assert [e.header.event_id for e in settled_events] == [
        f"ledger-settled-{INTERVAL_START_S}-r0",
        f"ledger-settled-{INTERVAL_START_S}-r1",
    ]
    traded_nano = sum(e * (250_000 if node == "n2" else 200_000) for _b, node, _s, _sn, e in TRADES)
    assert settled_events[0].traded_amount_nano == traded_nano
    assert settled_events[1].traded_amount_nano == 0  # a correction books no trade
    assert len([1 for subject, _d, _id in announced if ".checkpoint." in subject]) == 2

    url = f"http://127.0.0.1:{settled.ledger.ports['metrics_port']}/metrics"
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(urllib.request.urlopen(url, timeout=5).read().decode())
        for sample in family.samples
    }
    assert samples[("p2pgrid_ledger_intervals_settled_total", ())] == 1
    assert samples[("p2pgrid_ledger_transfers_total", (("kind", "trade.purchase"),))] == 3
    assert samples[("p2pgrid_ledger_settled_amount_nano_total", (("kind", "trade.purchase"),))] == traded_nano
    assert samples[("p2pgrid_ledger_transfers_total", (("kind", "deviation"),))] >= 2
    assert samples[("p2pgrid_ledger_chain_size", ())] == checkpoints[-1].tree_size


def test_a_participant_reads_only_its_own_account_statement_and_receipts(settled: Settled) -> None:
    with settled.ledger.channel() as channel:
        ledger = stub(channel)
        alice = token("alice")
        bob_account = account("bob")
        for call in (
            lambda: ledger.GetBalance(pb.GetBalanceRequest(account_id=bob_account), metadata=alice),
            lambda: ledger.GetStatement(pb.GetStatementRequest(account_id=bob_account), metadata=alice),
            lambda: ledger.GetBalance(
                pb.GetBalanceRequest(account_id="grid_operator:default"), metadata=alice
            ),
        ):
            assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
        own = ledger.GetStatement(pb.GetStatementRequest(), metadata=alice)
        assert own.transfers and all(
            account("alice") in (t.debit_account_id, t.credit_account_id) for t in own.transfers
        )
        bobs = ledger.GetStatement(pb.GetStatementRequest(account_id=bob_account), metadata=token("operator"))
        bobs_only = [
            t for t in bobs.transfers if account("alice") not in (t.debit_account_id, t.credit_account_id)
        ]
        assert bobs_only
        # Another's transfer and one that does not exist answer alike.
        others = rpc_error(
            lambda: ledger.GetReceipt(
                pb.GetReceiptRequest(transfer_id=bobs_only[0].transfer_id), metadata=alice
            )
        )
        missing = rpc_error(
            lambda: ledger.GetReceipt(pb.GetReceiptRequest(transfer_id="no-such"), metadata=alice)
        )
        assert others.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        assert (others.details() or "").replace(bobs_only[0].transfer_id, "X") == (
            missing.details() or ""
        ).replace("no-such", "X")
        receipt = ledger.GetReceipt(
            pb.GetReceiptRequest(transfer_id=own.transfers[0].transfer_id), metadata=alice
        )
        assert receipt.chain_seq == own.transfers[0].chain_seq
        denied = rpc_error(lambda: ledger.Verify(pb.VerifyRequest(), metadata=alice))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        report = ledger.Verify(pb.VerifyRequest(), metadata=token("operator"))
        latest = ledger.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=alice).checkpoints[-1]
        assert report.ok and report.transfers_checked == latest.tree_size and report.checkpoints_checked == 2
        # Paging: one transfer per page, in ledger order, until the page is not full.
        seqs: list[int] = []
        after = 0
        while True:
            page = ledger.GetStatement(pb.GetStatementRequest(after_seq=after, limit=1), metadata=alice)
            seqs += [t.chain_seq for t in page.transfers]
            if not page.next_after_seq:
                break
            after = page.next_after_seq
        assert seqs == [t.chain_seq for t in own.transfers]


def test_calls_without_valid_credentials_are_unauthenticated(settled: Settled) -> None:
    now = int(time.time())
    expired = make_token(KEYS["alice"], "p2pgrid.ledger.v1", now - 7200, now - 3600)
    other_service = make_token(KEYS["alice"], "p2pgrid.orderbook.v1", now - 10, now + 600)
    with settled.ledger.channel() as channel:
        ledger = stub(channel)
        bad: list[Metadata | None] = [
            None,
            (("authorization", f"Bearer {expired}"),),
            (("authorization", f"Bearer {other_service}"),),
            (("authorization", "Basic YWxpY2U6c2VjcmV0"),),
        ]
        for metadata in bad:
            with pytest.raises(grpc.RpcError) as info:
                ledger.GetBalance(pb.GetBalanceRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert rpc_error(lambda: ledger.ListCheckpoints(pb.ListCheckpointsRequest())).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", *args], capture_output=True, text=True, timeout=60
    )


def test_a_receipt_from_grpc_verifies_offline_and_a_changed_one_does_not(
    settled: Settled, tmp_path: Path
) -> None:
    key_file = str(settled.ledger.key_file) + ".pub"
    with settled.ledger.channel() as channel:
        ledger = stub(channel)
        statement = ledger.GetStatement(pb.GetStatementRequest(), metadata=token("dave"))
        checkpoints = ledger.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=token("dave")).checkpoints
        first = statement.transfers[0]
        latest = ledger.GetReceipt(
            pb.GetReceiptRequest(transfer_id=first.transfer_id), metadata=token("dave")
        )
        older = ledger.GetReceipt(
            pb.GetReceiptRequest(transfer_id=first.transfer_id, tree_size=checkpoints[0].tree_size),
            metadata=token("dave"),
        )
    assert (latest.tree_size, older.tree_size) == (checkpoints[-1].tree_size, checkpoints[0].tree_size)
    for name, receipt in (("latest", latest), ("older", older)):
        path = tmp_path / f"{name}.json"
        path.write_text(receipt.receipt_json)
        result = cli("receipt", "verify", str(path), "--key", key_file)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"OK: transfer {first.transfer_id}")
    data = json.loads(latest.receipt_json)
    amount = data["transfer"]["amount_nano"]
    data["entry"] = data["entry"].replace(f"|{amount}|", f"|{int(amount) + 1}|")
    data["transfer"]["amount_nano"] = str(int(amount) + 1)
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    result = cli("receipt", "verify", str(changed), "--key", key_file)
    assert result.returncode == 1 and result.stderr.startswith("FAIL:"), result


def test_checkpoints_are_signed_by_the_ledger_key_and_each_extends_the_previous(settled: Settled) -> None:
    with settled.ledger.channel() as channel:
        ledger = stub(channel)
        messages = ledger.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=token("bob")).checkpoints
        checkpoints = [
            Checkpoint(
                origin=c.origin,
                tree_size=c.tree_size,
                root_hash=c.root_hash,
                chain_head=c.chain_head,
                time_ms=c.time_ms,
                previous_hash=c.previous_hash,
                public_key=c.public_key,
                signature=c.signature,
            )
            for c in messages
        ]
        assert len(checkpoints) == 2
        proof = ledger.GetConsistencyProof(
            pb.GetConsistencyProofRequest(old_size=checkpoints[0].tree_size), metadata=token("bob")
        )
        assert proof.new_size == checkpoints[1].tree_size
        bad = rpc_error(
            lambda: ledger.GetConsistencyProof(
                pb.GetConsistencyProofRequest(old_size=5, new_size=4), metadata=token("bob")
            )
        )
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    verify_checkpoint_consistency(checkpoints[0], checkpoints[1], list(proof.hashes), settled.public_key)
    assert checkpoints[1].previous_hash == checkpoints[0].checkpoint_hash()


def test_ledger_verify_passes_on_the_services_database(settled: Settled) -> None:
    result = cli(
        "verify", "--database-url", settled.ledger.database_url, "--quiet",
        "--key", str(settled.ledger.key_file) + ".pub",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: ")


def test_a_contradicting_or_unreadable_event_is_refused_and_changes_nothing(settled: Settled) -> None:
    with settled.ledger.channel() as channel:
        before = stub(channel).GetStatement(
            pb.GetStatementRequest(account_id=account("carol")), metadata=token("operator")
        )
    refused_before = len(settled.ledger.logged("event refused, acked without effect"))
    other_trades = (("alice", "n2", "bob", "n1", 999),)
    publish(
        settled.nats_url,
        [
            Published(
                keyed(CLEARING_RESULT, INTERVAL_START_S),
                clearing_event(trades=other_trades, event_id="clearing-result-rerun"),
                "clearing-result-rerun",
            ),
            Published(keyed(INTERVAL_ENERGY, INTERVAL_START_S), b"\xff\x00not protobuf", "garbage-1"),
            Published(
                keyed(INTERVAL_ENERGY, INTERVAL_START_S),
                energy_event(9, (("m-bob", "bob", 0, 901, events_pb2.ENERGY_FLAG_MEASURED),)),
                "interval-energy-contradiction",
            ),
            # No event id in the message and no Nats-Msg-Id: it could not be applied exactly once.
            Published(
                keyed(INTERVAL_ENERGY, INTERVAL_START_S),
                events_pb2.IntervalEnergy(
                    interval=common_pb2.Interval(start_s=INTERVAL_START_S, length_s=900)
                ).SerializeToString(),
                "",
            ),
        ],
    )
    wait_until(lambda: consumers_pending(settled.nats_url) == 0, what="the events acked")
    wait_until(
        lambda: len(settled.ledger.logged("event refused, acked without effect")) == refused_before + 4,
        what=f"four refusals in\n{settled.ledger.log_tail()}",
    )
    time.sleep(0.5)  # a settlement, were one due, would run in this time
    assert settled.ledger.process is not None and settled.ledger.process.poll() is None
    assert len(settled.ledger.logged("interval settled")) == 2
    with settled.ledger.channel() as channel:
        after = stub(channel).GetStatement(
            pb.GetStatementRequest(account_id=account("carol")), metadata=token("operator")
        )
    assert after == before
    errors = sorted(
        line["error"] for line in settled.ledger.logged("event refused, acked without effect")[-4:]
    )
    assert errors[0].startswith("header.event_id: is required")
    assert "already has another clearing result" in errors[1]
    assert (
        errors[2].startswith("meter 'm-bob' in interval") and "contradicts the measured 0/900 Wh" in errors[2]
    )
    assert errors[3].startswith("not an IntervalEnergy event")


def test_a_broken_balance_invariant_stops_the_service_with_a_non_zero_exit(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    ledger = LedgerProcess(nats_server.url, tmp_path)
    try:
        ledger.start("--sim-start-s", str(AFTER_DEADLINE_S))
        # Money appears from nowhere, behind the ledger's back.
        engine = make_engine(ledger.database_url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO accounts VALUES ('participant:ghost', 'participant', 0, 5)"))
        engine.dispose()
        publish(nats_server.url, interval_events())
        assert ledger.wait_exit() == 1
    finally:
        ledger.close()
    assert ledger.logged("the ledger is broken; stopping")
    assert "BalanceInvariantError" in ledger.log_tail(50)
    engine = make_engine(ledger.database_url)
    try:
        assert LedgerStore(engine).transfers_of_interval(INTERVAL_START_S) == []
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_the_service_settles_on_postgresql_as_on_sqlite(
    nats_server: NatsServer, postgres_url: str, tmp_path: Path
) -> None:
    ledger = LedgerProcess(nats_server.url, tmp_path, database_url=postgres_url)
    expected = expected_balances(tmp_path, (*ENERGY_BATCHES,))
    engine = make_engine(postgres_url)
    try:
        ledger.start("--sim-start-s", str(AFTER_DEADLINE_S))
        publish(nats_server.url, interval_events())
        store = LedgerStore(engine)
        # Whichever event arrives first, the balances end as one settlement of all the data would leave them.
        wait_until(
            lambda: {a: b.balance_nano for a, b in store.balances().items()} == expected, what="the balances"
        )
        wait_until(
            lambda: consumers_pending(nats_server.url) == 0 and not store.pending_intervals(), what="idle"
        )
        assert ledger.stop() == 0, ledger.log_tail()
    finally:
        ledger.close()
        engine.dispose()
    result = cli("verify", "--database-url", postgres_url, "--quiet", "--key", str(ledger.key_file) + ".pub")
    assert result.returncode == 0, result.stderr
