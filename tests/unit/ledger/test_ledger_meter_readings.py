"""Meter-by-meter energy: a participant's energy is the sum of its meters, and settlement from held data recomputes it."""

from __future__ import annotations

import pytest

from services.ledger.domain.ledger import FLAG_CORRECTION
from services.ledger.domain.settlement import (
    AcceptedEnergy,
    ClearingResult,
    MeterEnergy,
    MeterQuality,
    MeterReading,
    SettlementInputError,
    SettlementInputs,
    SettlementRules,
    Trade,
    participant_energy,
    plan_first_settlement,
    plan_restaged_settlement,
    validate_inputs,
    validate_meter_readings,
)

START_S = 1_748_736_000
RULES = SettlementRules(grid_operator="dso", utility="ewz")
PRICES = {"n1": 200_000, "n2": 250_000}


def clearing() -> ClearingResult:
    return ClearingResult(
        "demo",
        START_S,
        PRICES,
        (Trade("alice", "n2", "bob", "n1", 1000),),
        (AcceptedEnergy("alice", 1000, 0), AcceptedEnergy("bob", 0, 1000)),
    )


def test_a_participants_energy_sums_its_meters_at_the_worst_quality_of_them() -> None:
    readings = [
        MeterReading("m2", "alice", 300, 10, MeterQuality.ESTIMATED),
        MeterReading("m9", "bob", 0, 1000),
        MeterReading("m1", "alice", 700, 0),
    ]
    assert participant_energy(readings) == (
        MeterEnergy("alice", 1000, 10, MeterQuality.ESTIMATED),
        MeterEnergy("bob", 0, 1000, MeterQuality.MEASURED),
    )
    assert participant_energy(reversed(readings)) == participant_energy(readings)


@pytest.mark.parametrize(
    ("reading", "message"),
    [
        (MeterReading("", "alice", 1, 0), "meter id ''"),
        (MeterReading("m 1", "alice", 1, 0), "meter id 'm 1'"),
        (MeterReading("m1", "al|ce", 1, 0), "participant id 'al|ce'"),
        (MeterReading("m1", "alice", -1, 0), r"meter_readings\[1\].import_wh"),
        (MeterReading("m1", "alice", 1, 10**13), r"meter_readings\[1\].export_wh"),
        (MeterReading("m1", "alice", 1, 0, MeterQuality.MISSING), r"meter_readings\[1\].quality"),
        (MeterReading("m0", "alice", 1, 0), "meter 'm0' appears twice"),
    ],
)
def test_bad_meter_readings_are_refused_naming_the_row(reading: MeterReading, message: str) -> None:
    with pytest.raises(SettlementInputError, match=message):
        validate_meter_readings([MeterReading("m0", "bob", 0, 0), reading])


def test_a_second_meter_arriving_after_settlement_is_booked_as_a_correction() -> None:
    first_meter = participant_energy(
        [MeterReading("m1", "alice", 600, 0), MeterReading("m3", "bob", 0, 1000)]
    )
    first = plan_first_settlement(SettlementInputs(clearing(), first_meter), RULES)
    # alice's first meter shows 400 Wh less than she bought: feed-in paid to her.
    deviation = {
        (t.debit_account, t.credit_account): t.amount_nano for t in first.transfers if t.code == "deviation"
    }
    assert deviation == {("utility:ewz", "participant:alice"): 400 * RULES.feed_in_tariff_micro_per_kwh}
    both = participant_energy(
        [
            MeterReading("m1", "alice", 600, 0),
            MeterReading("m2", "alice", 500, 0),
            MeterReading("m3", "bob", 0, 1000),
        ]
    )
    second = plan_restaged_settlement(SettlementInputs(clearing(), both), RULES, first.meter_state, 0)
    assert second is not None and second.revision == 1
    # Now she used 100 Wh more than she bought: the feed-in is taken back and retail charged.
    (correction,) = second.transfers
    assert (correction.debit_account, correction.credit_account, correction.flags) == (
        "participant:alice",
        "utility:ewz",
        FLAG_CORRECTION,
    )
    assert (
        correction.amount_nano
        == 400 * RULES.feed_in_tariff_micro_per_kwh + 100 * RULES.retail_tariff_micro_per_kwh
    )
    assert plan_restaged_settlement(SettlementInputs(clearing(), both), RULES, second.meter_state, 1) is None


def test_a_participant_may_trade_with_itself_between_two_nodes_but_not_at_one() -> None:
    across = ClearingResult(
        "demo",
        START_S,
        PRICES,
        (Trade("alice", "n2", "alice", "n1", 100),),
        (AcceptedEnergy("alice", 100, 100),),
    )
    plan = plan_first_settlement(SettlementInputs(across, (MeterEnergy("alice", 0, 0),)), RULES)
    paid = {(t.code, t.debit_account, t.credit_account): t.amount_nano for t in plan.transfers}
    assert paid[("trade.purchase", "participant:alice", "market:demo")] == 100 * 250_000
    assert paid[("trade.sale", "market:demo", "participant:alice")] == 100 * 200_000
    assert paid[("congestion_rent", "market:demo", "grid_operator:dso")] == 100 * 50_000
    assert ("deviation", "participant:alice", "utility:ewz") not in paid
    at_one = ClearingResult(
        "demo",
        START_S,
        PRICES,
        (Trade("alice", "n1", "alice", "n1", 100),),
        (AcceptedEnergy("alice", 100, 100),),
    )
    with pytest.raises(SettlementInputError, match="a trade with itself"):
        validate_inputs(SettlementInputs(at_one, ()))
