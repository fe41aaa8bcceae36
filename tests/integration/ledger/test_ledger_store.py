"""The ledger store on SQLite and PostgreSQL: exactly-once settlement, append-only rows, receipts, proofs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from services.domain.intervals import SimulatedClock
from services.ledger.adapters.sql import (
    LedgerStore,
    SettlementError,
    SettlementNotDueError,
    checkpoints_table,
    transfers_table,
)
from services.ledger.domain.ledger import (
    FLAG_CORRECTION,
    FLAG_ESTIMATED,
    MAX_AMOUNT_NANO,
    BalanceInvariantError,
    Status,
    Transfer,
)
from services.ledger.domain.merkle import verify_consistency
from services.ledger.domain.outcomes import SettlementStatus
from services.ledger.domain.receipt import Receipt, verify_receipt
from services.ledger.domain.settlement import (
    SettlementConflictError,
    SettlementInputError,
    SettlementInputs,
    SettlementRules,
    Trade,
)
from services.ledger.synthetic import SyntheticDay, synthetic_day
from services.platform.outbox import inbox_table, migrate_platform_tables, record_in_inbox

APPEND_ONLY = ("transfers", "chain", "merkle_nodes", "checkpoints", "settled_intervals")


@pytest.fixture(scope="module")
def day() -> SyntheticDay:
    return synthetic_day(participants=40, intervals=6, missing_per_interval=2, estimated_per_interval=1)


def inputs(day: SyntheticDay, k: int) -> SettlementInputs:
    return SettlementInputs.from_json(day.recorded[k])


def rules(day: SyntheticDay) -> SettlementRules:
    return SettlementRules.from_mapping(day.rules)


def count(store: LedgerStore, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def test_settling_an_interval_twice_changes_nothing(store: LedgerStore, day: SyntheticDay) -> None:
    first = store.settle_interval(inputs(day, 0), rules(day))
    assert first.status is SettlementStatus.SETTLED
    assert first.transfer_count > 0 and first.first_seq == 1 and first.tree_size == first.transfer_count
    assert first.checkpoint is not None and first.checkpoint.tree_size == first.tree_size
    rows = {t: count(store, t) for t in APPEND_ONLY}
    for _ in range(3):
        again = store.settle_interval(inputs(day, 0), rules(day))
        assert again.status is SettlementStatus.UNCHANGED
        assert (again.revision, again.tree_size, again.transfer_count) == (0, first.tree_size, 0)
        assert {t: count(store, t) for t in APPEND_ONLY} == rows
    store.verify(trusted_public_key=store.public_key)


def test_a_repeated_transfer_returns_the_first_and_a_different_body_is_refused(store: LedgerStore) -> None:
    a = Transfer("a", "participant:x", "market:m", 5, "manual")
    first = store.apply_transfers([a, Transfer("b", "participant:y", "market:m", 7, "manual")])
    assert [r.status for r in first.results] == [Status.CREATED, Status.CREATED]
    assert first.seqs == (1, 2)
    again = store.apply_transfers([Transfer("c", "market:m", "participant:x", 1, "manual"), a])
    assert [r.status for r in again.results] == [Status.CREATED, Status.EXISTS]
    assert again.seqs == (3, 1)
    conflict = store.apply_transfers([a._replace(amount_nano=6)])
    assert conflict.results[0].status is Status.REJECTED
    assert "different body" in conflict.results[0].reason
    assert conflict.checkpoint is None and count(store, "transfers") == 3
    assert store.balance("participant:x").balance_nano == -4
    assert store.balance("market:m").balance_nano == 11


def test_the_database_refuses_updates_and_deletes_of_appended_rows(
    store: LedgerStore, day: SyntheticDay
) -> None:
    for k in range(3):  # enough transfers for a stored Merkle node (256 leaves)
        store.settle_interval(inputs(day, k), rules(day))
    for table in APPEND_ONLY:
        assert count(store, table) > 0
        for statement in (
            f"UPDATE {table} SET {_some_column(table)} = {_some_column(table)}",
            f"DELETE FROM {table}",
        ):
            with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
                conn.execute(text(statement))
        assert count(store, table) > 0
    store.verify()


def _some_column(table: str) -> str:
    return {"merkle_nodes": "level", "checkpoints": "time_ms", "settled_intervals": "revision"}.get(
        table, "seq"
    )


def test_settlement_runs_in_the_callers_transaction_with_the_inbox_row(
    store: LedgerStore, day: SyntheticDay
) -> None:
    migrate_platform_tables(store.engine)
    with store.transaction() as conn:
        assert record_in_inbox(conn, "ledger-settlement", "event-1")
        store.settle_interval(inputs(day, 0), rules(day), connection=conn)
    # A failure after the settlement rolls back the inbox row and the transfers together.
    with pytest.raises(RuntimeError, match="crash"), store.transaction() as conn:
        assert record_in_inbox(conn, "ledger-settlement", "event-2")
        outcome = store.settle_interval(inputs(day, 1), rules(day), connection=conn)
        assert outcome.transfer_count > 0
        raise RuntimeError("crash before commit")
    with store.engine.connect() as conn:
        events = {r[0] for r in conn.execute(select(inbox_table.c.event_id))}
        size = conn.execute(select(func.max(checkpoints_table.c.tree_size))).scalar_one()
    assert events == {"event-1"}
    assert size == count(store, "transfers")
    # The redelivery applies it once, and the store's memory of the chain followed the rollback.
    with store.transaction() as conn:
        assert record_in_inbox(conn, "ledger-settlement", "event-2")
        assert (
            store.settle_interval(inputs(day, 1), rules(day), connection=conn).status
            is SettlementStatus.SETTLED
        )
    with store.transaction() as conn:
        assert not record_in_inbox(conn, "ledger-settlement", "event-2")
    store.verify(trusted_public_key=store.public_key)


def test_a_settlement_refused_part_way_leaves_nothing_in_the_callers_transaction(
    store: LedgerStore, day: SyntheticDay
) -> None:
    migrate_platform_tables(store.engine)
    store.settle_interval(inputs(day, 0), rules(day))
    # The first buyer of interval 1 is debited almost to the limit: its purchase in interval 1 would
    # overflow its debits, which is found only once the interval's transfers are on their way.
    buyer = f"participant:{inputs(day, 1).clearing.trades[0].buyer_id}"
    room = MAX_AMOUNT_NANO - store.balance(buyer).debits_nano
    outcome = store.apply_transfers([Transfer("near-limit", buyer, "utility:reserve", room - 1, "manual")])
    assert outcome.appended == 1
    before = {table: count(store, table) for table in APPEND_ONLY}
    with store.transaction() as conn:
        assert record_in_inbox(conn, "ledger-settlement", "event-1")
        with pytest.raises(SettlementError, match="would exceed"):
            store.settle_interval(inputs(day, 1), rules(day), connection=conn)
    assert {table: count(store, table) for table in APPEND_ONLY} == before
    with store.engine.connect() as conn:
        assert {r[0] for r in conn.execute(select(inbox_table.c.event_id))} == {"event-1"}
    store.verify(trusted_public_key=store.public_key)
    # The store's memory of the chain followed the rollback: the next batch appends where it should.
    assert store.apply_transfers(
        [Transfer("next", "utility:default", "grid_operator:default", 5, "manual")]
    ).appended
    assert store.verify(trusted_public_key=store.public_key).transfers == before["transfers"] + 1


def test_bad_rows_found_after_the_first_transfers_went_to_the_database_leave_nothing(
    store: LedgerStore,
) -> None:
    # A first settlement checks its rows once the first chunk of transfers is on its way to the
    # database: an interval of about a thousand transfers, with the bad row last.
    big = synthetic_day(participants=300, intervals=1)
    good = SettlementInputs.from_json(big.recorded[0])
    last = good.clearing.trades[-1]
    node = last.buyer_node
    cases = [
        (
            replace(good.clearing, trades=(*good.clearing.trades, replace(last, energy_wh=-5))),
            good.meter_energy,
            r"clearing.trades\[\d+\].energy_wh must be an integer",
        ),
        (
            replace(good.clearing, trades=(*good.clearing.trades, replace(last, seller_node="nowhere"))),
            good.meter_energy,
            "node 'nowhere' has no price",
        ),
        (good.clearing, (*good.meter_energy, good.meter_energy[0]), "appears twice"),
        (
            replace(
                good.clearing,
                node_prices_micro_per_kwh={**good.clearing.node_prices_micro_per_kwh, node: 1.5},
            ),
            good.meter_energy,
            rf"node_prices\[{node}\] must be an integer",
        ),
    ]
    before = {table: count(store, table) for table in APPEND_ONLY}
    for clearing_result, meter, message in cases:
        with pytest.raises(SettlementInputError, match=message):
            store.settle_interval(SettlementInputs(clearing_result, meter), rules(big))
        assert {table: count(store, table) for table in APPEND_ONLY} == before
    store.verify(trusted_public_key=store.public_key)
    outcome = store.settle_interval(good, rules(big))
    assert outcome.transfer_count > 3 * 256
    assert (
        store.verify(trusted_public_key=store.public_key).transfers
        == before["transfers"] + outcome.transfer_count
    )


def test_late_measured_data_is_booked_as_flagged_corrections(store: LedgerStore, day: SyntheticDay) -> None:
    first = store.settle_interval(inputs(day, 2), rules(day))
    assert len(first.estimated_participants) == 3
    estimated = [
        s for s in store.transfers_of_interval(first.interval_start_s) if s.transfer.flags & FLAG_ESTIMATED
    ]
    assert estimated, "deviations on estimated meter data are flagged"
    late = SettlementInputs.from_json(day.late[2])
    second = store.settle_interval(late, rules(day))
    assert second.status is SettlementStatus.CORRECTED
    assert second.revision == 1 and second.estimated_participants == ()
    corrections = [
        s.transfer for s in store.transfers_of_interval(first.interval_start_s) if s.seq >= second.first_seq
    ]
    assert len(corrections) == second.transfer_count > 0
    assert all(t.flags & FLAG_CORRECTION and not t.flags & FLAG_ESTIMATED for t in corrections)
    assert {t.code for t in corrections} == {"deviation"}
    assert store.settle_interval(late, rules(day)).status is SettlementStatus.UNCHANGED
    # A stale estimate delivered again after the measurement changes nothing either.
    assert store.settle_interval(inputs(day, 2), rules(day)).status is SettlementStatus.UNCHANGED
    assert [r.revision for r in store.settled_revisions("demo", first.interval_start_s)] == [0, 1]
    store.verify()


def test_a_different_clearing_result_for_a_settled_interval_is_refused(
    store: LedgerStore, day: SyntheticDay
) -> None:
    store.settle_interval(inputs(day, 0), rules(day))
    original = inputs(day, 0)
    t0 = original.clearing.trades[0]
    changed_trades = (
        Trade(t0.buyer_id, t0.buyer_node, t0.seller_id, t0.seller_node, t0.energy_wh),
        *original.clearing.trades,
    )
    data = original.to_json()
    data["trades"] = [
        [t.buyer_id, t.buyer_node, t.seller_id, t.seller_node, t.energy_wh] for t in changed_trades
    ]
    data["accepted"] = [
        [
            a.participant_id,
            a.bought_wh + (t0.energy_wh if a.participant_id == t0.buyer_id else 0),
            a.sold_wh + (t0.energy_wh if a.participant_id == t0.seller_id else 0),
        ]
        for a in original.clearing.accepted
    ]
    with pytest.raises(SettlementConflictError, match="another clearing result"):
        store.settle_interval(SettlementInputs.from_json(data), rules(day))


def test_an_interval_is_not_settled_before_its_metering_deadline(
    database_url: str, make_store: Callable[[str], LedgerStore], day: SyntheticDay
) -> None:
    store = make_store(database_url)
    first = inputs(day, 0)
    store.clock = SimulatedClock(start_s=float(first.interval_start_s + 900 + 899))
    with pytest.raises(SettlementNotDueError, match="due"):
        store.settle_interval(first, rules(day))
    store.clock = SimulatedClock(start_s=float(first.interval_start_s + 900 + 900))
    assert store.settle_interval(first, rules(day)).status is SettlementStatus.SETTLED


def test_receipts_verify_offline_and_with_the_cli(
    store: LedgerStore, day: SyntheticDay, tmp_path: Path
) -> None:
    for k in range(3):
        store.settle_interval(inputs(day, k), rules(day))
    transfers = store.transfers_of_interval(inputs(day, 1).interval_start_s)
    picked = [transfers[0], transfers[len(transfers) // 2], transfers[-1]]
    for stored in picked:
        receipt = store.receipt(stored.transfer.transfer_id)
        assert receipt.seq == stored.seq and receipt.transfer == stored.transfer
        data = json.loads(json.dumps(receipt.to_json()))
        verify_receipt(Receipt.from_json(data), store.public_key)
    # Against an older checkpoint too.
    older = store.checkpoints()[1]
    verify_receipt(store.receipt(picked[0].transfer.transfer_id, tree_size=older.tree_size), store.public_key)

    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(store.receipt(picked[1].transfer.transfer_id).to_json(), indent=2))
    key = store.public_key.hex()
    ok = subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", "receipt", "verify", str(path), "--key", key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert picked[1].transfer.transfer_id in ok.stdout
    data = json.loads(path.read_text())
    data["transfer"]["amount_nano"] = str(int(data["transfer"]["amount_nano"]) + 1)
    data["entry"] = data["entry"].replace(
        f"|{int(data['transfer']['amount_nano']) - 1}|", f"|{data['transfer']['amount_nano']}|"
    )
    path.write_text(json.dumps(data))
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", "receipt", "verify", str(path), "--key", key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "does not lead to the root" in bad.stderr


def test_consistency_proofs_link_every_pair_of_checkpoints(store: LedgerStore, day: SyntheticDay) -> None:
    for k in range(5):
        store.settle_interval(inputs(day, k), rules(day))
    checkpoints = store.checkpoints()
    assert len(checkpoints) == 5
    for old in checkpoints:
        for new in checkpoints:
            if old.tree_size <= new.tree_size:
                proof = store.consistency_proof(old.tree_size, new.tree_size)
                verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)


def test_balance_and_statement_show_the_accounts_own_transfers(store: LedgerStore, day: SyntheticDay) -> None:
    for k in range(3):
        store.settle_interval(inputs(day, k), rules(day))
    participant = day.participants[0]
    account = f"participant:{participant}"
    start = inputs(day, 0).interval_start_s
    lines = store.statement(account, from_interval_start_s=start, to_interval_start_s=start + 3 * 900)
    assert lines and all(account in (ln.transfer.debit_account, ln.transfer.credit_account) for ln in lines)
    assert sum(ln.amount_nano for ln in lines) == store.balance(account).balance_nano
    paged = store.statement(
        account, from_interval_start_s=start, to_interval_start_s=start + 3 * 900, limit=2
    )
    rest = store.statement(
        account, from_interval_start_s=start, to_interval_start_s=start + 3 * 900, after_seq=paged[-1].seq
    )
    assert [ln.seq for ln in paged + rest] == [ln.seq for ln in lines]
    assert store.balance("market:demo").balance_nano == 0
    assert sum(b.balance_nano for b in store.balances().values()) == 0
    with pytest.raises(LookupError):
        store.balance("participant:nobody")


def test_two_stores_writing_in_turn_keep_one_chain(
    database_url: str, make_store: Callable[[str], LedgerStore], day: SyntheticDay
) -> None:
    first = make_store(database_url)
    second = make_store(database_url)
    for k in range(4):
        (first if k % 2 else second).settle_interval(inputs(day, k), rules(day))
    first.apply_transfers([Transfer("manual-1", "utility:default", "market:demo", 9, "manual")])
    second.apply_transfers([Transfer("manual-2", "market:demo", "utility:default", 9, "manual")])
    report = first.verify(trusted_public_key=first.public_key)
    with first.engine.connect() as conn:
        assert (
            report.transfers == conn.execute(select(func.count()).select_from(transfers_table)).scalar_one()
        )
    assert report.checkpoints == 6


def test_a_batch_after_account_totals_were_damaged_stops_loudly_and_writes_nothing(
    store: LedgerStore, day: SyntheticDay
) -> None:
    store.settle_interval(inputs(day, 0), rules(day))
    store.apply_transfers([Transfer("side", "utility:default", "grid_operator:default", 5, "manual")])
    before = count(store, "transfers")
    with store.engine.begin() as conn:  # behind the ledger's back; accounts are not append-only
        conn.execute(
            text("UPDATE accounts SET credits_nano = credits_nano + 1 WHERE account_id = 'market:demo'")
        )
    with pytest.raises(BalanceInvariantError, match="not zero"):
        store.apply_transfers([Transfer("next", "utility:default", "grid_operator:default", 7, "manual")])
    assert count(store, "transfers") == before
