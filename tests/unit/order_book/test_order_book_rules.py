"""Market rules: the calendar of open intervals and gate times, and the field checks of an order."""

from __future__ import annotations

import pytest

from services.domain.errors import FailedPrecondition, InvalidArgument
from services.order_book.domain.market import MarketRules
from services.order_book.domain.orders import OrderBody, Side

RULES = MarketRules(
    interval_s=900,
    gate_closure_s=300,
    horizon_intervals=4,
    price_tick_micro_per_kwh=100,
    min_price_micro_per_kwh=100,
    max_price_micro_per_kwh=1_000_000,
    max_energy_wh=50_000,
    nodes=frozenset({"n1", "n2"}),
)
T0 = 1_800_000_000  # a multiple of 900


def body(**changes: object) -> OrderBody:
    values: dict[str, object] = {
        "client_order_id": "c-1",
        "side": Side.BUY,
        "node_id": "n1",
        "interval_start_s": T0 + 900,
        "energy_wh": 1000,
        "price_micro_per_kwh": 100_000,
    }
    values.update(changes)
    return OrderBody(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now_s", "first_s"),
    [
        (T0 - 301, T0),  # T0's gate (T0 - 300) is still ahead
        (T0 - 300, T0 + 900),  # at the gate time T0 is closed
        (T0 - 299.5, T0 + 900),
        (T0 + 599, T0 + 900),
        (T0 + 600, T0 + 1800),
    ],
)
def test_the_first_open_interval_is_the_first_whose_gate_lies_strictly_ahead(
    now_s: float, first_s: int
) -> None:
    assert RULES.first_open_start_s(now_s) == first_s
    assert list(RULES.open_starts(now_s)) == [first_s + i * 900 for i in range(4)]
    assert RULES.last_open_start_s(now_s) == first_s + 3 * 900


def test_an_interval_closes_at_its_gate_time_exactly() -> None:
    assert not RULES.is_closed(T0, T0 - 300.001)
    assert RULES.is_closed(T0, T0 - 300)
    with pytest.raises(FailedPrecondition) as info:
        RULES.check_interval(T0, T0 - 300, "body.interval_start_s")
    assert info.value.field == "body.interval_start_s"
    assert f"({T0})" in str(info.value) and f"({T0 - 300})" in str(info.value)


def test_the_horizon_ends_at_the_last_open_interval() -> None:
    now_s = T0 - 400
    RULES.check_interval(T0 + 3 * 900, now_s, "f")
    with pytest.raises(InvalidArgument, match="after the horizon"):
        RULES.check_interval(T0 + 4 * 900, now_s, "f")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"client_order_id": ""}, "body.client_order_id"),
        ({"client_order_id": "é"}, "body.client_order_id"),
        ({"client_order_id": "x" * 65}, "body.client_order_id"),
        ({"side": 0}, "body.side"),
        ({"node_id": ""}, "body.node_id"),
        ({"node_id": "n3"}, "body.node_id"),
        ({"node_id": "n2"}, "body.node_id"),
        ({"energy_wh": 0}, "body.energy_wh"),
        ({"energy_wh": -1}, "body.energy_wh"),
        ({"energy_wh": 50_001}, "body.energy_wh"),
        ({"price_micro_per_kwh": 0}, "body.price_micro_per_kwh"),
        ({"price_micro_per_kwh": -100}, "body.price_micro_per_kwh"),
        ({"price_micro_per_kwh": 150}, "body.price_micro_per_kwh"),
        ({"price_micro_per_kwh": 1_000_100}, "body.price_micro_per_kwh"),
        ({"interval_start_s": 0}, "body.interval_start_s"),
        ({"interval_start_s": -900}, "body.interval_start_s"),
        ({"interval_start_s": T0 + 901}, "body.interval_start_s"),
        ({"interval_start_s": T0 + 9000}, "body.interval_start_s"),
    ],
)
def test_each_bad_field_is_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        RULES.check_body(body(**changes), "n1", T0 - 400)
    assert info.value.field == field


def test_a_good_order_passes_and_the_field_prefix_is_used() -> None:
    RULES.check_body(body(), "n1", T0 - 400)
    with pytest.raises(InvalidArgument) as info:
        RULES.check_body(body(energy_wh=0), "n1", T0 - 400, prefix="orders[7].body")
    assert info.value.field == "orders[7].body.energy_wh"


@pytest.mark.parametrize(
    "bad",
    [
        {"interval_s": 0},
        {"gate_closure_s": -1},
        {"horizon_intervals": 0},
        {"price_tick_micro_per_kwh": 0},
        {"min_price_micro_per_kwh": 2_000_000},
        {"max_energy_wh": 0},
        {"nodes": frozenset()},
    ],
)
def test_inconsistent_rules_are_refused(bad: dict[str, object]) -> None:
    values: dict[str, object] = {
        "interval_s": 900,
        "gate_closure_s": 300,
        "horizon_intervals": 4,
        "price_tick_micro_per_kwh": 100,
        "min_price_micro_per_kwh": 100,
        "max_price_micro_per_kwh": 1_000_000,
        "max_energy_wh": 1,
        "nodes": frozenset({"n1"}),
    }
    values.update(bad)
    with pytest.raises(ValueError):
        MarketRules(**values)  # type: ignore[arg-type]
