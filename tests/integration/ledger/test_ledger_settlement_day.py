"""A whole recorded market day settled through the store, checked against an independent computation.

The recorded day (synthetic, reproducible) has 96 intervals and 1,000
participants, trades across nodes and feeders, trades with the utility's
standing orders, and in every interval a few meters that are missing or only
estimated at the deadline and measured later. The test recomputes every
amount from the recorded JSON with its own arithmetic and compares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from services.ledger.adapters.sql import LedgerStore
from services.ledger.domain.ledger import FLAG_CORRECTION, FLAG_ESTIMATED
from services.ledger.domain.outcomes import SettlementStatus
from services.ledger.domain.settlement import SettlementInputs, SettlementRules
from services.ledger.synthetic import UTILITY_PARTICIPANT, SyntheticDay, synthetic_day


def account(participant: str, utility: str = "utility:default") -> str:
    return utility if participant == UTILITY_PARTICIPANT else f"participant:{participant}"


class Expected:
    """Every amount of the day, from the recorded JSON, by plain arithmetic."""

    def __init__(self, day: SyntheticDay) -> None:
        rules: dict[str, Any] = day.rules
        feeders = rules["feeders"]
        self.balance: Counter[str] = Counter()
        self.purchases: Counter[tuple[int, str, int]] = Counter()
        self.sales: Counter[tuple[int, str, int]] = Counter()
        self.fees: Counter[tuple[int, str, int]] = Counter()
        self.deviation: dict[tuple[int, str], int] = {}
        self.trade_count = 0
        late = {r["interval_start_s"]: r for r in day.late}
        for recorded in day.recorded:
            start = recorded["interval_start_s"]
            prices = recorded["node_prices_micro_per_kwh"]
            pairs: Counter[tuple[str, str, str, str]] = Counter()
            for buyer, buyer_node, seller, seller_node, energy_wh in recorded["trades"]:
                pairs[(buyer, buyer_node, seller, seller_node)] += energy_wh
            contracted: Counter[str] = Counter()
            for (buyer, buyer_node, seller, seller_node), energy_wh in pairs.items():
                self.trade_count += 1
                paid = energy_wh * prices[buyer_node]
                received = energy_wh * prices[seller_node]
                if buyer_node == seller_node:
                    fee_rate = rules["grid_fee_same_node_micro_per_kwh"]
                elif feeders.get(buyer_node) == feeders.get(seller_node):
                    fee_rate = rules["grid_fee_same_feeder_micro_per_kwh"]
                else:
                    fee_rate = rules["grid_fee_micro_per_kwh"]
                fee = energy_wh * fee_rate
                self.purchases[(start, account(buyer), paid)] += 1
                self.sales[(start, account(seller), received)] += 1
                self.balance[account(buyer)] -= paid
                self.balance[account(seller)] += received
                self.balance["grid_operator:default"] += paid - received  # congestion rent
                if buyer != UTILITY_PARTICIPANT:
                    self.fees[(start, account(buyer), fee)] += 1
                    self.balance[account(buyer)] -= fee
                    self.balance["grid_operator:default"] += fee
                contracted[buyer] += energy_wh
                contracted[seller] -= energy_wh
            measured = {row[0]: row for row in recorded["meter_energy"] if row[3] == "measured"}
            measured.update({row[0]: row for row in late.get(start, {"meter_energy": []})["meter_energy"]})
            for participant in day.participants:
                _p, import_wh, export_wh, _q = measured[participant]
                deviation_wh = import_wh - export_wh - contracted[participant]
                tariff = (
                    rules["retail_tariff_micro_per_kwh"]
                    if deviation_wh > 0
                    else rules["feed_in_tariff_micro_per_kwh"]
                )
                owed = deviation_wh * tariff
                self.deviation[(start, participant)] = owed
                self.balance[account(participant)] -= owed
                self.balance["utility:default"] += owed


def settle_day(store: LedgerStore, day: SyntheticDay) -> None:
    rules = SettlementRules.from_mapping(day.rules)
    for recorded in day.recorded:
        outcome = store.settle_interval(SettlementInputs.from_json(recorded), rules)
        assert outcome.status is SettlementStatus.SETTLED
    # Redelivered first data changes nothing.
    for recorded in day.recorded[:5]:
        assert (
            store.settle_interval(SettlementInputs.from_json(recorded), rules).status
            is SettlementStatus.UNCHANGED
        )
    for recorded in day.late:
        outcome = store.settle_interval(SettlementInputs.from_json(recorded), rules)
        assert outcome.status is SettlementStatus.CORRECTED
        assert outcome.estimated_participants == ()


def check_day(store: LedgerStore, day: SyntheticDay) -> None:
    expected = Expected(day)
    transfers = [s.transfer for r in day.recorded for s in store.transfers_of_interval(r["interval_start_s"])]

    # Every trade paid once: one purchase and one sale per trade, at the node prices.
    purchases = Counter(
        (t.interval_start_s, t.debit_account, t.amount_nano) for t in transfers if t.code == "trade.purchase"
    )
    sales = Counter(
        (t.interval_start_s, t.credit_account, t.amount_nano) for t in transfers if t.code == "trade.sale"
    )
    assert sum(purchases.values()) == sum(sales.values()) == expected.trade_count
    assert purchases == expected.purchases
    assert sales == expected.sales
    assert not any(t.flags for t in transfers if t.code.startswith("trade."))

    # Grid fees as configured (same node, same feeder, otherwise).
    fees = Counter(
        (t.interval_start_s, t.debit_account, t.amount_nano) for t in transfers if t.code == "grid_fee"
    )
    assert fees == expected.fees

    # Deviations: first booked on estimates (flagged), then corrected to the measured amounts.
    deviation: Counter[tuple[int, str]] = Counter()
    for t in transfers:
        if t.code != "deviation":
            continue
        if t.debit_account.startswith("participant:"):
            deviation[(t.interval_start_s, t.debit_account.split(":", 1)[1])] += t.amount_nano
        else:
            deviation[(t.interval_start_s, t.credit_account.split(":", 1)[1])] -= t.amount_nano
    assert {k: v for k, v in deviation.items() if v} == {k: v for k, v in expected.deviation.items() if v}
    estimated = [t for t in transfers if t.flags & FLAG_ESTIMATED]
    corrections = [t for t in transfers if t.flags & FLAG_CORRECTION]
    assert estimated and corrections
    assert all(t.code == "deviation" for t in estimated + corrections)

    # Balances: the market ends at zero and every account matches the independent totals.
    balances = {a: b.balance_nano for a, b in store.balances().items()}
    assert balances["market:demo"] == 0
    assert sum(balances.values()) == 0
    assert {a: v for a, v in balances.items() if v} == {a: v for a, v in expected.balance.items() if v}

    report = store.verify(trusted_public_key=store.public_key)
    assert report.transfers == len(transfers)
    assert report.checkpoints == len(day.recorded) + len(day.late)


@pytest.mark.slow
def test_a_recorded_day_of_96_intervals_and_1000_participants_settles_exactly(
    sqlite_store: LedgerStore,
) -> None:
    day = synthetic_day(participants=1000, intervals=96)
    settle_day(sqlite_store, day)
    check_day(sqlite_store, day)


@pytest.mark.postgres
def test_a_recorded_morning_settles_exactly_on_postgresql(
    postgres_url: str, make_store: Callable[[str], LedgerStore]
) -> None:
    day = synthetic_day(participants=200, intervals=12, seed=11)
    store = make_store(postgres_url)
    settle_day(store, day)
    check_day(store, day)
