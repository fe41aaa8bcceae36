"""The certificate check accepts what the matcher produces and rejects results broken by hand."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from matcher_support import book, grid_from_lines, line, single_node

from services.domain.grid import Grid, grid_from_dict, grid_to_dict
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.result import result_to_json
from services.matcher.domain.verify import VerificationError, verify_result

Document = dict[str, Any]


def congested() -> tuple[ClearingInput, Grid, Document]:
    """A feeder whose lateral l2 (20 kW, 5000 Wh per interval) binds exactly at its limit."""
    grid = grid_from_lines([line("l1", 0, 1, 50_000), line("l2", 1, 2, 20_000)], nodes=3)
    request = book(
        [
            ("s0", "n0", "sell", 20_000, 100_000),
            ("s1", "n0", "sell", 3_000, 150_000),
            ("b2", "n2", "buy", 10_000, 300_000),
            ("b3", "n2", "buy", 1_000, 250_000),
            ("b0", "n0", "buy", 5_000, 200_000),
        ],
        grid,
    )
    return request, grid, json.loads(result_to_json(clear(request, grid)))


def uncongested() -> tuple[ClearingInput, Grid, Document]:
    grid = single_node()
    request = book(
        [
            ("b1", "n0", "buy", 100, 300_000),
            ("b2", "n0", "buy", 50, 200_000),
            ("s1", "n0", "sell", 120, 100_000),
        ],
        grid,
    )
    return request, grid, json.loads(result_to_json(clear(request, grid)))


def entry(document: Document, key: str, field: str, value: str) -> dict[str, Any]:
    return next(item for item in document[key] if item[field] == value)


@pytest.mark.parametrize("case", [congested, uncongested])
def test_the_matchers_own_results_pass(case: Callable[[], tuple[ClearingInput, Grid, Document]]) -> None:
    request, grid, document = case()
    report = verify_result(request, grid, document)
    assert report.orders == len(request)
    assert report.welfare_nano == document["welfare_nano"]
    assert report.welfare_gap_bound_nano == 0  # the binding line is exactly at its limit


def broken(
    change: Callable[[Document], None], case: Callable[[], tuple[ClearingInput, Grid, Document]] = congested
) -> str:
    request, grid, document = case()
    tampered = copy.deepcopy(document)
    change(tampered)
    with pytest.raises(VerificationError) as caught:
        verify_result(request, grid, tampered)
    return str(caught.value)


def test_a_node_price_moved_one_tick_is_rejected() -> None:
    def move(document: Document) -> None:
        entry(document, "nodes", "node_id", "n2")["price_micro_per_kwh"] += 100

    message = broken(move)
    assert "b2" in message and "not an equilibrium" in message


def test_all_prices_moved_one_tick_together_break_the_midpoint_rule() -> None:
    def move(document: Document) -> None:
        for node in document["nodes"]:
            node["price_micro_per_kwh"] += 100

    message = broken(move, uncongested)
    assert "midpoint" in message or "not an equilibrium" in message


def test_a_line_reported_one_watt_over_its_capacity_is_rejected() -> None:
    def overload(document: Document) -> None:
        entry(document, "lines", "line_id", "l2")["flow_w"] = 20_001

    assert broken(overload) == "line l2: flow_w 20001 exceeds its capacity_w 20000 (overloaded)"


def test_accepted_orders_that_overload_a_line_by_one_watt_are_rejected() -> None:
    # The same result on a grid whose lateral is 1 W weaker: the flows the
    # accepted orders cause now exceed its limit.
    request, grid, document = congested()
    weaker = grid_to_dict(grid)
    weaker["lines"][1]["capacity_w"] = 19_999
    with pytest.raises(
        VerificationError, match=r"line l2: the accepted orders make it carry 5000\.000000 Wh .*overloaded"
    ):
        verify_result(request, grid_from_dict(weaker), document)


def test_an_order_filled_beyond_its_energy_is_rejected() -> None:
    def overfill(document: Document) -> None:
        entry(document, "orders", "order_id", "s0")["accepted_wh"] = 20_001

    message = broken(overfill)
    assert "s0" in message and ("over-filled" in message or "balance" in message)


def test_a_partly_accepted_order_with_one_wh_more_breaks_the_balance() -> None:
    def more(document: Document) -> None:
        entry(document, "orders", "order_id", "b2")["accepted_wh"] += 1

    assert broken(more).startswith("balance: accepted buys total")


def test_a_fully_accepted_order_over_filled_by_one_wh_is_named() -> None:
    def overfill(document: Document) -> None:
        entry(document, "orders", "order_id", "b0")["accepted_wh"] = 5_001
        entry(document, "orders", "order_id", "s0")["accepted_wh"] += 1

    assert broken(overfill) == "order 'b0': accepted_wh 5001 exceeds its energy_wh 5000 (over-filled)"


def test_a_shadow_price_on_a_line_that_is_not_binding_is_rejected() -> None:
    def shadow(document: Document) -> None:
        entry(document, "lines", "line_id", "l1")["shadow_price_micro_per_kwh"] = 5.0

    assert "l1" in broken(shadow)


def test_a_binding_flag_on_a_slack_line_is_rejected() -> None:
    def flag(document: Document) -> None:
        entry(document, "lines", "line_id", "l1")["binding"] = True

    assert broken(flag).startswith("line l1: marked binding but its flow is")


def test_tampered_trades_welfare_or_rent_are_rejected() -> None:
    def trade(document: Document) -> None:
        document["trades"][0]["energy_wh"] += 1

    def welfare(document: Document) -> None:
        document["welfare_nano"] += 1

    def rent(document: Document) -> None:
        document["congestion_rent_nano"] -= 1

    def duplicate(document: Document) -> None:
        document["trades"].append(dict(document["trades"][0]))

    assert "trades total" in broken(trade)
    assert broken(welfare).startswith("welfare_nano")
    assert broken(rent).startswith("congestion_rent_nano")
    assert "trade twice" in broken(duplicate)


def test_a_missing_order_node_or_field_is_named() -> None:
    def drop_order(document: Document) -> None:
        document["orders"] = [o for o in document["orders"] if o["order_id"] != "b3"]

    def drop_node(document: Document) -> None:
        document["nodes"].pop()

    def drop_field(document: Document) -> None:
        del document["trades"]

    assert broken(drop_order) == "order 'b3': missing from the result"
    assert broken(drop_node) == "nodes: 'n2' is missing from the result"
    assert broken(drop_field) == "result: the field 'trades' is missing"
