"""Held clearing results and meter energy settle exactly once when due, whatever the redeliveries and crashes."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from ledger_testing import LEDGER_KEY
from sqlalchemy import Connection

from services.ledger.adapters.sql import LedgerStore
from services.ledger.domain.outcomes import SettlementStatus
from services.ledger.domain.settlement import (
    MeterEnergy,
    MeterQuality,
    SettlementConflictError,
    SettlementInputs,
    SettlementRules,
)
from services.ledger.synthetic import synthetic_day
from services.platform.outbox import migrate_platform_tables, record_in_inbox


@dataclass
class SettableClock:
    t_s: float

    def now_s(self) -> float:
        return self.t_s

    async def sleep_until(self, t_s: float) -> None:
        self.t_s = max(self.t_s, t_s)


class Crash(Exception):
    pass


def deliver(
    store: LedgerStore, event_id: str, apply: Callable[[Connection], object], *, crash: bool = False
) -> None:
    """What the consumer does: inbox row and effect in one transaction (which may die before commit)."""
    try:
        with store.transaction() as conn:
            if record_in_inbox(conn, "ledger", event_id):
                apply(conn)
            if crash:
                raise Crash(event_id)
    except Crash:
        pass


def test_held_data_settles_once_when_due_whatever_the_redeliveries(
    database_url: str, make_store: Callable[[str], LedgerStore]
) -> None:
    day = synthetic_day(participants=30, intervals=4, seed=9)
    rules = SettlementRules.from_mapping(day.rules)
    inputs = [SettlementInputs.from_json(r) for r in day.recorded]
    late = [SettlementInputs.from_json(r) for r in day.late]
    first_start = inputs[0].interval_start_s

    staged = make_store(database_url)
    clock = SettableClock(float(first_start))
    staged.clock = clock
    migrate_platform_tables(staged.engine)
    rng = random.Random(4)

    def clearing_event(item: SettlementInputs) -> Callable[[Connection], object]:
        return lambda conn: staged.stage_clearing(item.clearing, connection=conn)

    def meter_event(
        item: SettlementInputs, readings: tuple[MeterEnergy, ...]
    ) -> Callable[[Connection], object]:
        return lambda conn: staged.stage_meter_energy(
            item.market_id, item.interval_start_s, readings, connection=conn
        )

    for item in inputs:
        half = len(item.meter_energy) // 2
        events = [
            (f"clearing-{item.interval_start_s}", clearing_event(item)),
            (f"meter-{item.interval_start_s}-0", meter_event(item, item.meter_energy[:half])),
            (f"meter-{item.interval_start_s}-1", meter_event(item, item.meter_energy[half:])),
        ]
        deliveries = [event for event in events for _ in range(3)]
        rng.shuffle(deliveries)
        for event_id, apply in deliveries:
            deliver(staged, event_id, apply, crash=rng.random() < 0.3)
        for event_id, apply in events:  # whatever crashed is redelivered until it sticks
            deliver(staged, event_id, apply)

    # Nothing is due before the metering deadline of the first interval.
    clock.t_s = first_start + 900 + 899
    assert staged.settle_due(lambda _market: rules) == []
    assert [start for _m, start in staged.pending_intervals()] == [i.interval_start_s for i in inputs]
    clock.t_s = first_start + 4 * 900 + 900
    outcomes = staged.settle_due(lambda _market: rules)
    assert [o.status for o in outcomes] == [SettlementStatus.SETTLED] * 4
    assert staged.settle_due(lambda _market: rules) == []
    assert staged.pending_intervals() == []

    # Late measured data, delivered twice, books corrections once.
    for item in late:
        for _ in range(2):
            staged.stage_meter_energy(item.market_id, item.interval_start_s, item.meter_energy)
    corrected = staged.settle_due(lambda _market: rules)
    assert [o.status for o in corrected] == [SettlementStatus.CORRECTED] * len(late)
    assert staged.settle_due(lambda _market: rules) == []
    # A stale estimate changes nothing and leaves nothing pending.
    stale = MeterEnergy(inputs[0].meter_energy[0].participant_id, 1, 1, MeterQuality.ESTIMATED)
    assert staged.stage_meter_energy(inputs[0].market_id, first_start, [stale]) == 0
    assert staged.pending_intervals() == []

    # The same day settled directly gives the very same chain.
    direct = make_store(database_url.replace("p2pgrid.db", "direct.db")) if "sqlite" in database_url else None
    if direct is not None:
        for item in inputs:
            direct.settle_interval(item, rules)
        for item in late:
            direct.settle_interval(item, rules)
        assert (
            direct.verify().root_hash
            == staged.verify(trusted_public_key=bytes(LEDGER_KEY.verify_key)).root_hash
        )
    else:
        staged.verify(trusted_public_key=bytes(LEDGER_KEY.verify_key))


def test_contradicting_deliveries_are_refused(
    database_url: str, make_store: Callable[[str], LedgerStore]
) -> None:
    day = synthetic_day(participants=10, intervals=1, seed=2)
    other = synthetic_day(participants=10, intervals=1, seed=3)
    store = make_store(database_url)
    item = SettlementInputs.from_json(day.recorded[0])
    assert store.stage_clearing(item.clearing)
    assert not store.stage_clearing(item.clearing)
    changed = SettlementInputs.from_json({**other.recorded[0], "interval_start_s": item.interval_start_s})
    with pytest.raises(SettlementConflictError, match="another clearing result"):
        store.stage_clearing(changed.clearing)
    reading = next(m for m in item.meter_energy if m.quality is MeterQuality.MEASURED)
    assert store.stage_meter_energy(item.market_id, item.interval_start_s, [reading]) == 1
    assert store.stage_meter_energy(item.market_id, item.interval_start_s, [reading]) == 0
    with pytest.raises(SettlementConflictError, match="contradicts"):
        store.stage_meter_energy(
            item.market_id,
            item.interval_start_s,
            [MeterEnergy(reading.participant_id, reading.import_wh + 1, 0)],
        )
