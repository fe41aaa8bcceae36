"""Meter energy held meter by meter: batches combine per participant, settle once when due, and late meters correct."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import Connection, text

from services.ledger.adapters.sql import LedgerStore
from services.ledger.domain.ledger import FLAG_CORRECTION, FLAG_ESTIMATED
from services.ledger.domain.outcomes import SettlementOutcome, SettlementStatus
from services.ledger.domain.settlement import (
    AcceptedEnergy,
    ClearingResult,
    MeterQuality,
    MeterReading,
    SettlementConflictError,
    SettlementInputs,
    SettlementRules,
    Trade,
    participant_energy,
)

START_S = 1_800_000_000
RULES = SettlementRules(grid_operator="dso", utility="ewz")
CLEARING = ClearingResult(
    "demo",
    START_S,
    {"n1": 200_000, "n2": 250_000},
    (Trade("alice", "n2", "bob", "n1", 1000), Trade("carol", "n1", "bob", "n1", 200)),
    (AcceptedEnergy("alice", 1000, 0), AcceptedEnergy("bob", 0, 1200), AcceptedEnergy("carol", 200, 0)),
)
BATCH_1 = (MeterReading("a1", "alice", 700, 0), MeterReading("b1", "bob", 0, 1150))
BATCH_2 = (MeterReading("a2", "alice", 350, 0), MeterReading("c1", "carol", 180, 0, MeterQuality.ESTIMATED))


@dataclass
class Clock:
    t_s: float

    def now_s(self) -> float:
        return self.t_s

    async def sleep_until(self, t_s: float) -> None:
        self.t_s = max(self.t_s, t_s)


def balances(store: LedgerStore) -> dict[str, int]:
    return {a: b.balance_nano for a, b in store.balances().items()}


def test_batches_combine_meter_by_meter_and_settle_once_like_the_summed_energy(
    store: LedgerStore, make_store: Callable[[str], LedgerStore], sqlite_url: str
) -> None:
    clock = Clock(START_S + 900)
    store.clock = clock
    for readings in (BATCH_1, BATCH_2, BATCH_2, BATCH_1):  # redeliveries change nothing
        with store.transaction() as conn:
            store.stage_meter_readings("demo", START_S, readings, connection=conn)
    assert store.stage_meter_readings("demo", START_S, BATCH_1) == 0
    store.stage_clearing(CLEARING)
    assert store.settle_due(lambda _m: RULES) == []  # before the metering deadline
    clock.t_s = START_S + 1800

    announced: list[tuple[SettlementOutcome, int]] = []

    def on_settled(conn: Connection, outcome: SettlementOutcome) -> None:
        rows = store.transfers_in_range(
            outcome.first_seq, outcome.first_seq + outcome.transfer_count - 1, connection=conn
        )
        announced.append((outcome, len(rows)))

    (outcome,) = store.settle_due(lambda _m: RULES, on_settled=on_settled)
    assert outcome.status is SettlementStatus.SETTLED and outcome.estimated_participants == ("carol",)
    assert announced == [(outcome, outcome.transfer_count)]
    assert store.settle_due(lambda _m: RULES, on_settled=on_settled) == []

    # The same interval settled in one go from the summed energy books the same transfers.
    direct = make_store(sqlite_url.replace("p2pgrid.db", "direct.db"))
    direct.settle_interval(SettlementInputs(CLEARING, participant_energy([*BATCH_1, *BATCH_2])), RULES)
    assert balances(store) == balances(direct)
    deviations = {
        s.transfer.credit_account: s.transfer.flags
        for s in store.transfers_of_interval(START_S)
        if s.transfer.code == "deviation"
    }
    # carol (estimated) used 20 Wh less than she bought and is paid feed-in; alice (measured) pays retail.
    assert deviations == {"participant:carol": FLAG_ESTIMATED, "utility:ewz": 0}


def test_a_meter_arriving_after_settlement_corrects_instead_of_contradicting(store: LedgerStore) -> None:
    store.clock = Clock(START_S + 1800)
    store.stage_clearing(CLEARING)
    store.stage_meter_readings("demo", START_S, BATCH_1)
    (first,) = store.settle_due(lambda _m: RULES)
    store.stage_meter_readings("demo", START_S, BATCH_2)
    (second,) = store.settle_due(lambda _m: RULES)
    assert (second.status, second.revision) == (SettlementStatus.CORRECTED, 1)
    corrections = store.transfers_in_range(second.first_seq, second.tree_size)
    assert corrections and all(s.transfer.flags & FLAG_CORRECTION for s in corrections)
    alice = store.balance("participant:alice").balance_nano
    # alice: 1000 Wh bought at 250000 plus the grid fee, then 50 Wh more used than bought at retail.
    assert alice == -(
        1000 * 250_000 + 1000 * RULES.grid_fee_micro_per_kwh + 50 * RULES.retail_tariff_micro_per_kwh
    )
    assert first.revision == 0
    store.verify()


def test_contradicting_or_reassigned_meters_are_refused_and_change_nothing(store: LedgerStore) -> None:
    assert store.stage_meter_readings("demo", START_S, BATCH_1) == 2
    with pytest.raises(SettlementConflictError, match=r"meter 'a1' .* contradicts the measured 700/0 Wh"):
        store.stage_meter_readings("demo", START_S, [MeterReading("a1", "alice", 701, 0)])
    with pytest.raises(SettlementConflictError, match=r"meter 'b1' .* held for participant 'bob'"):
        store.stage_meter_readings("demo", START_S, [MeterReading("b1", "carol", 0, 1150)])
    # An estimate is replaced by a measurement, never the other way.
    assert (
        store.stage_meter_readings(
            "demo", START_S, [MeterReading("c1", "carol", 1, 0, MeterQuality.ESTIMATED)]
        )
        == 1
    )
    assert store.stage_meter_readings("demo", START_S, [MeterReading("c1", "carol", 2, 0)]) == 1
    assert (
        store.stage_meter_readings(
            "demo", START_S, [MeterReading("c1", "carol", 3, 0, MeterQuality.ESTIMATED)]
        )
        == 0
    )
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT meter_id, import_wh FROM staged_meter_readings ORDER BY meter_id")
        ).all()
    assert [tuple(r) for r in rows] == [("a1", 700), ("b1", 0), ("c1", 2)]


def test_a_refused_interval_is_reported_and_stays_pending_while_later_ones_settle(store: LedgerStore) -> None:
    store.clock = Clock(START_S + 10 * 900)
    later = ClearingResult(
        "demo", START_S + 900, CLEARING.node_prices_micro_per_kwh, CLEARING.trades, CLEARING.accepted
    )
    store.stage_clearing(CLEARING)
    store.stage_clearing(later)
    # A held meter whose participant id the settlement cannot book (written behind the store's back).
    with store.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO staged_meter_readings VALUES ('demo', :s, 'x1', 'bad|id', 1, 0, 2, 0)"),
            {"s": START_S},
        )
    refused: list[tuple[str, int, str]] = []
    outcomes = store.settle_due(lambda _m: RULES, on_error=lambda m, s, e: refused.append((m, s, str(e))))
    assert [o.interval_start_s for o in outcomes] == [START_S + 900]
    assert [(m, s) for m, s, _e in refused] == [("demo", START_S)] and "bad|id" in refused[0][2]
    assert store.pending_intervals() == [("demo", START_S)]
    with pytest.raises(ValueError, match=r"bad\|id"):
        store.settle_due(lambda _m: RULES)
