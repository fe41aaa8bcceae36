"""The edge cases of a clearing, with the outcome each documented rule gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matcher_support import book, grid_from_lines, line, lp_optimum, single_node

from services.domain.grid import ConsistencyError, Grid, grid_from_dict
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput, OrderError
from services.matcher.domain.result import ClearingResult, result_to_json
from services.matcher.domain.verify import verify_result


def cleared(request: ClearingInput, grid: Grid) -> ClearingResult:
    result = clear(request, grid)
    verify_result(request, grid, json.loads(result_to_json(result)))
    return result


def accepted(result: ClearingResult) -> dict[str, int]:
    return dict(zip(result.order_ids, result.accepted_wh.tolist(), strict=True))


def test_an_empty_book_trades_nothing_at_price_zero() -> None:
    grid = grid_from_lines([line("l1", 0, 1, 1000)], nodes=2)
    result = cleared(book([], grid), grid)
    assert result.traded_wh == 0 and result.welfare_nano == 0 and len(result.trade_energy_wh) == 0
    assert result.node_price_micro_per_kwh.tolist() == [0, 0]


def test_a_book_of_buys_only_trades_nothing_at_the_best_buy() -> None:
    grid = single_node()
    result = cleared(book([("b1", "n0", "buy", 10, 200_000), ("b2", "n0", "buy", 5, 250_000)], grid), grid)
    assert result.traded_wh == 0
    assert result.node_price_micro_per_kwh.tolist() == [250_000]


def test_a_book_of_sells_only_trades_nothing_at_the_best_sell() -> None:
    grid = single_node()
    result = cleared(book([("s1", "n0", "sell", 10, 200_000), ("s2", "n0", "sell", 5, 150_000)], grid), grid)
    assert result.traded_wh == 0
    assert result.node_price_micro_per_kwh.tolist() == [150_000]


def test_without_a_crossing_the_price_is_midway_between_the_best_buy_and_the_best_sell() -> None:
    grid = single_node()
    rows = [("b1", "n0", "buy", 10, 200_000), ("s1", "n0", "sell", 10, 250_100)]
    result = cleared(book(rows, grid), grid)
    assert result.traded_wh == 0
    # (200000 + 250100) / 2 = 225050 exactly.
    assert result.node_price_micro_per_kwh.tolist() == [225_050]


def test_a_half_micro_midpoint_rounds_half_to_even() -> None:
    grid = grid_from_lines([], nodes=1)
    grid = Grid(grid.nodes, grid.lines, grid.slack, grid.interval_minutes, 1)
    for low, high, expected in ((3, 4, 4), (5, 6, 6), (6, 7, 6)):
        rows = [("b1", "n0", "buy", 10, low), ("s1", "n0", "sell", 10, high)]
        result = cleared(book(rows, grid), grid)
        assert result.node_price_micro_per_kwh.tolist() == [expected]


def test_when_everything_crosses_with_equal_volumes_the_price_is_midway_between_the_last_sell_and_the_last_buy() -> (
    None
):
    grid = single_node()
    rows = [
        ("b1", "n0", "buy", 10, 300_000),
        ("b2", "n0", "buy", 10, 280_000),
        ("s1", "n0", "sell", 15, 100_000),
        ("s2", "n0", "sell", 5, 120_000),
    ]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"b1": 10, "b2": 10, "s1": 15, "s2": 5}
    assert result.node_price_micro_per_kwh.tolist() == [200_000]


def test_when_everything_crosses_the_longer_side_sets_the_price() -> None:
    grid = single_node()
    rows = [("b1", "n0", "buy", 30, 300_000), ("s1", "n0", "sell", 10, 100_000)]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"b1": 10, "s1": 10}
    assert result.node_price_micro_per_kwh.tolist() == [300_000]


def test_when_all_prices_are_equal_the_most_energy_trades_at_that_price() -> None:
    grid = single_node()
    rows = [
        ("b1", "n0", "buy", 40, 150_000),
        ("b2", "n0", "buy", 20, 150_000),
        ("s1", "n0", "sell", 30, 150_000),
    ]
    result = cleared(book(rows, grid), grid)
    # Welfare is zero whatever trades; the volume rule trades all 30 Wh of supply,
    # shared by the buys pro rata (40:20).
    assert result.welfare_nano == 0
    assert accepted(result) == {"b1": 20, "b2": 10, "s1": 30}
    assert result.node_price_micro_per_kwh.tolist() == [150_000]


def test_one_huge_order_is_cleared_exactly() -> None:
    grid = single_node()
    rows = [
        ("big", "n0", "sell", 10**12, 50_000),
        ("b1", "n0", "buy", 7, 300_000),
        ("b2", "n0", "buy", 3, 90_000),
    ]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"big": 10, "b1": 7, "b2": 3}
    assert result.node_price_micro_per_kwh.tolist() == [50_000]
    assert result.welfare_nano == 7 * 300_000 + 3 * 90_000 - 10 * 50_000


def test_a_zero_capacity_line_on_a_feeder_separates_its_side_completely() -> None:
    grid = grid_from_lines([line("l1", 0, 1, 0)], nodes=2)
    rows = [
        ("s0", "n0", "sell", 10, 100_000),
        ("b1", "n1", "buy", 10, 300_000),
        ("s1", "n1", "sell", 4, 200_000),
    ]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"s0": 0, "b1": 4, "s1": 4}
    assert result.flow_w.tolist() == [0]
    assert bool(result.binding[0])
    # n1 is its own market: its partly filled buy sets the price there.
    assert result.node_price_micro_per_kwh.tolist()[1] == 300_000


def test_a_zero_capacity_line_on_a_loop_is_refused_by_the_matcher() -> None:
    grid = grid_from_lines(
        [line("a", 0, 1, 0, 1.0), line("b", 1, 2, 10**6, 1.0), line("c", 0, 2, 10**6, 1.0)], nodes=3
    )
    with pytest.raises(ConsistencyError, match=r"line a: capacity_w 0 is too small for a meshed network"):
        clear(book([("b1", "n1", "buy", 5, 100_000)], grid), grid)


def test_parallel_lines_both_bind_when_their_shares_reach_their_limits() -> None:
    # Two equal parallel lines of 4000 W each (1000 Wh per interval): the
    # transfer splits evenly, so 2000 Wh can cross.
    grid = grid_from_lines([line("p1", 0, 1, 4000, 0.01), line("p2", 0, 1, 4000, 0.01)], nodes=2)
    rows = [("s0", "n0", "sell", 5000, 100_000), ("b1", "n1", "buy", 5000, 300_000)]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"s0": 2000, "b1": 2000}
    assert result.flow_w.tolist() == [4000, 4000]
    assert result.binding.tolist() == [True, True]
    assert result.node_price_micro_per_kwh.tolist() == [100_000, 300_000]
    # Buyers pay 0.30 and sellers get 0.10 for 2 kWh: 0.40 of congestion rent.
    assert result.congestion_rent_nano == 2000 * 200_000


def test_congestion_splits_prices_and_the_rent_is_the_price_difference_times_the_flow() -> None:
    grid = grid_from_lines([line("l1", 0, 1, 50_000), line("l2", 1, 2, 20_000)], nodes=3)
    rows = [
        ("s0", "n0", "sell", 20_000, 100_000),
        ("b2", "n2", "buy", 10_000, 300_000),
        ("b0", "n0", "buy", 5_000, 200_000),
    ]
    result = cleared(book(rows, grid), grid)
    assert accepted(result) == {"s0": 10_000, "b2": 5_000, "b0": 5_000}
    assert result.binding.tolist() == [False, True]
    assert result.node_price_micro_per_kwh.tolist() == [100_000, 100_000, 300_000]
    assert result.shadow_price_micro_per_kwh.tolist() == [0, pytest.approx(200_000)]
    assert result.congestion_rent_nano == 5_000 * 200_000
    assert result.welfare_nano == pytest.approx(lp_optimum(book(rows, grid), grid))
    # A buyer at n2 trading with a seller at n0 pays n2's price; the seller gets n0's.
    buyers = [result.order_ids[i] for i in result.trade_buyer_row.tolist()]
    assert "b2" in buyers


def test_trades_never_exceed_accepted_buys_plus_sells_minus_one() -> None:
    grid = single_node()
    rng = np.random.default_rng(7)
    rows = [
        (
            f"o{i}",
            "n0",
            "buy" if i % 2 else "sell",
            int(rng.integers(1, 100)),
            int(rng.integers(1, 5)) * 100_000,
        )
        for i in range(200)
    ]
    result = cleared(book(rows, grid), grid)
    traded = int(np.count_nonzero(result.accepted_wh))
    assert 0 < len(result.trade_energy_wh) <= traded - 1


def trade_list(result: ClearingResult) -> list[tuple[str, str, int]]:
    ids = result.order_ids
    return [
        (ids[buyer], ids[seller], energy)
        for buyer, seller, energy in zip(
            result.trade_buyer_row.tolist(),
            result.trade_seller_row.tolist(),
            result.trade_energy_wh.tolist(),
            strict=True,
        )
    ]


def test_where_a_buy_and_a_sell_end_at_the_same_energy_the_next_pair_starts_afresh() -> None:
    grid = single_node()
    rows = [
        ("b1", "n0", "buy", 5, 300_000),
        ("s1", "n0", "sell", 5, 100_000),
        ("b2", "n0", "buy", 7, 300_000),
        ("s2", "n0", "sell", 3, 100_000),
        ("s3", "n0", "sell", 4, 100_000),
    ]
    result = cleared(book(rows, grid), grid)
    assert trade_list(result) == [("b1", "s1", 5), ("b2", "s2", 3), ("b2", "s3", 4)]


def test_trades_add_up_to_each_order_beyond_a_billion_wh_traded() -> None:
    grid = single_node()
    rng = np.random.default_rng(11)
    rows = [
        (f"o{i}", "n0", "buy" if i % 3 else "sell", int(rng.integers(10**8, 6 * 10**8)), 200_000)
        for i in range(30)
    ]
    result = cleared(book(rows, grid), grid)
    assert result.traded_wh > 2**31
    per_order = np.zeros(len(rows), dtype=np.int64)
    np.add.at(per_order, result.trade_buyer_row, result.trade_energy_wh)
    np.add.at(per_order, result.trade_seller_row, result.trade_energy_wh)
    assert per_order.tolist() == result.accepted_wh.tolist()
    assert bool(np.all(result.trade_energy_wh > 0))
    assert len(result.trade_energy_wh) <= int(np.count_nonzero(result.accepted_wh)) - 1


def utility_grid(capacity_w: int = 4000) -> Grid:
    return grid_from_dict(
        {
            "interval_minutes": 15,
            "price_tick_micro_per_kwh": 100,
            "slack": "n0",
            "nodes": [{"id": "n0"}],
            "lines": [],
            "utility": {
                "retail_price_per_kwh": "0.30",
                "feed_in_price_per_kwh": "0.08",
                "capacity_w": capacity_w,
            },
        }
    )


def test_the_utility_sells_at_its_retail_tariff_when_local_supply_runs_short() -> None:
    grid = utility_grid()
    result = cleared(
        book([("b1", "n0", "buy", 600, 350_000), ("s1", "n0", "sell", 200, 100_000)], grid), grid
    )
    # 1000 Wh of transformer capacity per interval; 400 Wh come from the utility.
    assert accepted(result) == {"utility-retail": 400, "utility-feed-in": 0, "b1": 600, "s1": 200}
    assert result.node_price_micro_per_kwh.tolist() == [300_000]


def test_the_utility_buys_surplus_at_its_feed_in_tariff() -> None:
    grid = utility_grid()
    result = cleared(book([("s1", "n0", "sell", 700, 50_000), ("b1", "n0", "buy", 100, 200_000)], grid), grid)
    assert accepted(result) == {"utility-retail": 0, "utility-feed-in": 600, "s1": 700, "b1": 100}
    assert result.node_price_micro_per_kwh.tolist() == [80_000]


def test_with_a_utility_the_price_stays_between_its_tariffs() -> None:
    grid = utility_grid(capacity_w=400)  # only 100 Wh either way
    result = cleared(book([("b1", "n0", "buy", 5_000, 900_000)], grid), grid)
    # The utility's 100 Wh cannot cover the demand: the buy is partly filled and sets the price.
    assert accepted(result)["b1"] == 100
    assert result.node_price_micro_per_kwh.tolist() == [900_000]
    result = cleared(book([("b1", "n0", "buy", 50, 900_000), ("s1", "n0", "sell", 50, 10_000)], grid), grid)
    # Local orders cross completely; the tariffs bound the admissible interval [0.08, 0.30].
    assert accepted(result)["b1"] == 50
    assert result.node_price_micro_per_kwh.tolist() == [190_000]


def test_the_utilitys_order_ids_are_reserved() -> None:
    grid = utility_grid()
    with pytest.raises(OrderError, match="order 'utility-retail': this order id is reserved"):
        clear(book([("utility-retail", "n0", "buy", 10, 100_000)], grid), grid)


def test_three_identical_parallel_lines_binding_together_get_prices_and_shadow_prices() -> None:
    # Found by hypothesis: the shadow price of identical parallel lines can be
    # split among them in many ways, which the sequence of price LPs must survive.
    grid = grid_from_lines(
        [
            line("l1", 0, 1, 10, 1.0),
            line("l2", 1, 2, 10, 1.0),
            line("l3", 0, 3, 28, 1.0),
            line("m0", 0, 1, 19, 0.5),
            line("m1", 1, 2, 10, 1.0),
            line("m2", 1, 2, 10, 1.0),
        ],
        nodes=4,
    )
    rows = [
        ("o0", "n0", "sell", 1, 100),
        ("o1", "n1", "sell", 1, 0),
        ("o2", "n2", "buy", 8, 700),
        ("o3", "n0", "buy", 1, 0),
        ("o4", "n1", "buy", 2, 100),
        ("o5", "n0", "buy", 1, 0),
        ("o6", "n0", "buy", 1, 0),
        ("o7", "n0", "buy", 1, 0),
        ("o8", "n0", "sell", 7, 0),
    ]
    result = cleared(book(rows, grid), grid)
    assert result.binding.tolist() == [False, True, False, True, True, True]
    assert result.node_price_micro_per_kwh.tolist()[2] == 700
